"""Hugging Face NemotronH checkpoints: load and save, strictly, memory-mapped, atomically.

A model directory is ``config.json`` plus ``model.safetensors`` or shards with
``model.safetensors.index.json`` (and usually ``tokenizer.json`` / ``tokenizer_config.json``).
Tensor names are the released ones (``backbone.*``; transformers' in-memory ``model.*`` is accepted).
``mtp.*`` (multi-token-prediction) tensors are ignored with a note. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import NanoConfig
from .errors import CheckpointError
from .headers import INDEX_NAME, SINGLE_NAME, read_safetensors_header, weight_file_list
from .memory import canonical_dtype
from .model import NanoForCausalLM
from .quant import int8_skeleton, is_int8, quantize_int8, quantized_names, stored_int8

log = logging.getLogger("nanocli_model")

_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
INT8 = "int8"  # load_pretrained's dtype for int8 projections (quant.py): float32 between them
TRAINER_STATE = "trainer_state.pt"  # a training checkpoint's optimizer state beside the weights, never weights


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return _TORCH[canonical_dtype(dtype, ("fp32", "bf16", "fp16"))]


# ---------------------------------------------------------------------------- reading
def weight_files(path: Path) -> dict[str, Path]:
    """Map each stored tensor name to the file that holds it (from the headers, validated up front)."""
    files = weight_file_list(path)
    if not files:
        pickles = [p for p in (*path.glob("*.bin"), *path.glob("*.pt")) if p.name != TRAINER_STATE]
        if pickles:
            raise CheckpointError(f"{path}: only pickle weights (*.bin/*.pt) found; nano never unpickles, "
                                  "convert them to safetensors first")
        raise CheckpointError(f"no safetensors weights in {path} ({SINGLE_NAME} or {INDEX_NAME}); is this a model "
                              "directory?")
    out: dict[str, Path] = {}
    for f in files:
        for name in read_safetensors_header(f):
            if name in out:
                raise CheckpointError(f"{f}: tensor {name} is also stored in {out[name]}; the checkpoint is "
                                      "inconsistent")
            out[name] = f
    return out


def canonical_name(name: str) -> str | None:
    """Stored name -> nano's name; None for tensors that are deliberately ignored."""
    if name.startswith("mtp."):
        return None
    if name.startswith("model."):  # transformers' in-memory prefix
        return "backbone." + name[len("model."):]
    return name


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def load_pretrained(path: str | Path, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu", int8_lm_head: bool = True) -> NanoForCausalLM:
    """Load a NemotronH directory. ``dtype=None`` keeps the stored dtype of the weights.

    ``dtype="int8"``: int8 projections (``quant.quantize_int8``, CPU only): float32 everywhere, the
    projections (and lm_head, with ``int8_lm_head``) smoothed on the calibration batch and quantized per output
    channel, one layer at a time: each layer's projection weights are read from the files only when the
    calibration pass reaches that layer and are freed once quantized, so the peak is the int8 model plus one
    layer's float projections (or the float lm_head), not the whole float model. A directory saved that way
    (``quantization_config.quant_method == "nano-int8"``) loads back as saved, without re-quantizing: int8
    weights, float32 scales and smoothing divisors as stored, the rest in ``dtype``.

    The model is built on the meta device and the memory-mapped tensors are assigned into it, so a
    checkpoint needs about one copy of its weights in memory. Strict: any missing, unexpected or
    wrongly shaped tensor is a ``CheckpointError`` naming it and its file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a model directory (config.json + safetensors)")
    config = NanoConfig.from_json_file(path / "config.json")
    stored_q = stored_int8(config)
    quantize = dtype == INT8
    if quantize or stored_q is not None:
        if torch.device(device).type != "cpu":
            raise CheckpointError(f"{path}: int8 weights run on the CPU only (fbgemm's int8 kernels); use "
                                  "--device cpu, or load a float checkpoint with --dtype bf16")
        dtype = "fp32" if quantize else dtype
    files = weight_files(path)
    with torch.device("meta"):
        model = NanoForCausalLM(config)
        if stored_q is not None:
            int8_skeleton(model, stored_q)
    int8_names = {k for k, v in model.state_dict().items() if v.dtype == torch.int8}
    # --dtype int8 from a float checkpoint: projection weights are read layer by layer by quantize_int8
    deferred = ({f"{n}.weight" for n in quantized_names(model, int8_lm_head)} if quantize and stored_q is None
                else set())
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}

    def int8_float32(canon: str) -> bool:  # an int8 Linear's scale or smoothing divisor: F32, kept as stored
        return canon.endswith((".weight_scale", ".smooth")) and canon.rsplit(".", 1)[0] + ".weight" in int8_names
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)

    stored: dict[str, tuple[str, Path]] = {}  # canonical -> (stored name, file)
    headers = {f: read_safetensors_header(f) for f in sorted(set(files.values()))}
    ignored = []
    for name, file in files.items():
        canon = canonical_name(name)
        if canon is None:
            ignored.append(name)
            continue
        if canon in stored:
            raise CheckpointError(f"{file}: tensor {canon} is stored twice (as {stored[canon][0]} and {name})")
        stored[canon] = (name, file)
    if ignored:
        log.warning("ignoring %d multi-token-prediction tensors (mtp.*) in %s", len(ignored), path)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]}{_more(missing)}; the weights do not match "
                              "config.json")
    if unexpected:
        name, file = stored[unexpected[0]]
        raise CheckpointError(f"{file}: unexpected tensor {name}{_more(unexpected)}; the weights do not match "
                              "config.json")
    for canon, (name, file) in stored.items():
        shape, st_dtype = list(headers[file][name].shape), headers[file][name].dtype
        if shape != expected[canon]:
            raise CheckpointError(f"{file}: tensor {name} has shape {shape}, config.json implies {expected[canon]}")
        if canon in int8_names:
            if st_dtype != "I8":
                raise CheckpointError(f"{file}: tensor {name} has dtype {st_dtype}; config.json's "
                                      "quantization_config says int8 (I8)")
        elif int8_float32(canon):
            if st_dtype != "F32":
                raise CheckpointError(f"{file}: tensor {name} has dtype {st_dtype}; an int8 scale is F32")
        elif st_dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has dtype {st_dtype}; expected a float type (F32/BF16/F16)")

    emb_name, emb_file = stored["backbone.embeddings.weight"]
    target = resolve_dtype(dtype) or _SAFETENSORS_DTYPES[headers[emb_file][emb_name].dtype]
    device = torch.device(device)
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for canon, (name, file) in stored.items():
        if canon not in deferred:
            by_file.setdefault(file, []).append((canon, name))
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device=str(device) if device.type != "cpu" else "cpu") as f:
                for canon, name in names:
                    keep = canon in int8_names or int8_float32(canon)  # as stored
                    t = f.get_tensor(name)
                    state[canon] = _finite(t, name, file, t.dtype if keep else target)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{file}: cannot read tensor data ({e}); the file is truncated or corrupt") from None
    model.load_state_dict(state, strict=not (config.tie_word_embeddings or deferred), assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    if deferred:
        quantize_int8(model, lm_head=int8_lm_head, read=lambda module: _read_float(stored[f"{module}.weight"]))
    return model.eval()


def _read_float(where: tuple[str, Path]) -> torch.Tensor:
    """One stored tensor, as float32 (a deferred projection weight of an int8 load)."""
    name, file = where
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            t = f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: cannot read tensor data ({e}); the file is truncated or corrupt") from None
    return _finite(t, name, file, torch.float32)


def _finite(tensor: torch.Tensor, name: str, file: Path, target: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``target``; a NaN/Inf weight (stored, or from the cast) is a CheckpointError."""
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"{file}: tensor {name} holds NaN or Inf values; the weights are corrupt (a diverged "
                              "run?): load an earlier checkpoint")
    out = tensor.to(target)
    if out.dtype != tensor.dtype and not torch.isfinite(out).all():
        raise CheckpointError(f"{file}: tensor {name} overflows {str(target).replace('torch.', '')}; load it in "
                              "its stored dtype or bf16/fp32")
    return out


# ---------------------------------------------------------------------------- writing
def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def parse_size(size: int | str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / bytes -> bytes."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


_MODEL_FILES = ("config.json", INDEX_NAME)


def save_pretrained(model: NanoForCausalLM, path: str | Path, max_shard_size: int | str = "5GB",
                    extra_files: Iterable[str | Path] = ()) -> Path:
    """Write ``model`` as a NemotronH directory, atomically.

    Everything is written into a temporary sibling directory and renamed into place, so ``path`` is
    always either the previous complete checkpoint or the new complete one. Files of an existing
    ``path`` that are not model files (training state, tokenizer) are carried over unless
    ``extra_files`` replaces them.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    max_bytes = parse_size(max_shard_size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        config = model.config.replace(torch_dtype=str(model.dtype).replace("torch.", ""))
        if not is_int8(model) and "quantization_config" in config.extra:  # a float model keeps no int8 label
            config = config.replace(extra={k: v for k, v in config.extra.items() if k != "quantization_config"})
        (tmp / "config.json").write_text(config.to_json_string(), encoding="utf-8")
        shards = _shards(state, max_bytes)
        names = ([SINGLE_NAME] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for shard, fname in zip(shards, names):
            save_file({k: v.cpu().contiguous() for k, v in shard.items()}, str(tmp / fname), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                     "weight_map": {k: fname for shard, fname in zip(shards, names) for k in shard}}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)
        if path.is_dir():  # keep what lives beside the weights (tokenizer, training state)
            for old in path.iterdir():
                if (old.name in _MODEL_FILES or old.suffix == ".safetensors" or (tmp / old.name).exists()
                        or not old.is_file()):
                    continue
                shutil.copy2(old, tmp / old.name)
        match_umask(tmp)
        _fsync_dir(tmp)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def match_umask(directory: Path) -> None:
    """Give ``directory`` and the files directly in it the modes a plain ``mkdir`` and ``open`` would have under
    the user's umask (0777 / 0666 less the umask): ``mkdtemp`` makes 0700 and safetensors writes 0600, and a
    directory renamed into place keeps them."""
    mask = current_umask()
    os.chmod(directory, 0o777 & ~mask)
    for f in directory.iterdir():
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~mask)


def _fsync_dir(directory: Path) -> None:
    for f in directory.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is moved aside first and removed after."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
