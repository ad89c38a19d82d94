"""The life of a training run directory, shared by pretrain, align and distill.

``resume_point`` decides where a run starts (fresh; the newest checkpoint with ``--resume auto``; a
given one) and refuses to overwrite a run that was not asked to resume. ``check_resumable`` holds a
resume to the same architecture and the settings that fix the trajectory. ``Checkpointer`` writes
model + tokenizer + training state (optimizer by parameter name, RNG, step) atomically, keeps the last
K, and works the same for one process, DDP and FSDP2. ``Recorder`` appends ``metrics.jsonl`` and
forwards each step to the UI hook; ``finish`` draws the loss curve and measures peak memory.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from nanocli_model.errors import NanoError

from . import checkpoints as ckpt
from .loop import MetricsLog

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def resume_point(out: Path, resume: str | None, error: type[NanoError]) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (``out`` must then hold no checkpoints)."""
    existing = ckpt.list_checkpoints(out)
    if resume is None:
        if existing:
            raise error(f"{out} already holds checkpoints (newest {existing[-1][1].name}); pass "
                        "--resume auto to continue that run, or choose another --out")
        return None
    if resume == "auto":
        return existing[-1][1] if existing else None
    path = Path(resume)
    if not ckpt.is_complete(path):
        raise error(f"--resume {path}: not a complete training checkpoint (config.json, safetensors, "
                    f"{ckpt.TRAINER_STATE})")
    return path


def check_resumable(path: Path, config, hparams: dict, keys: Sequence[str], error: type[NanoError]) -> None:
    """Same architecture as ``config`` and the same values for ``keys`` as the checkpoint's hyperparameters."""
    from nanocli_model import NanoConfig

    saved = NanoConfig.from_json_file(path / "config.json").to_dict()
    mine = config.to_dict()
    diff = sorted(k for k in set(saved) | set(mine) if k != "torch_dtype" and saved.get(k) != mine.get(k))
    if diff:
        raise error(f"{path}: its architecture differs from this run's ({diff[0]}: {saved.get(diff[0])!r} "
                    f"vs {mine.get(diff[0])!r}); resume with the same model, or choose another --out")
    old = ckpt.read_hparams(path)
    changed = [k for k in keys if k in old and old[k] != hparams.get(k)]
    if changed:
        k = changed[0]
        raise error(f"{path}: --{k.replace('_', '-')} was {old[k]!r}, now {hparams.get(k)!r}; an exact resume "
                    "needs the run's settings (start a new run with --model CHECKPOINT to change them)")


def side_files(directory: Path) -> list[Path]:
    """The tokenizer files in ``directory`` that every checkpoint carries."""
    return [directory / f for f in TOKENIZER_FILES if (directory / f).is_file()]


def own_memory(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter its own writable memory (``load_pretrained`` may map the file) before training."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model


def optimizer_state(wrapped, optimizer) -> dict:
    """The optimizer state keyed by parameter name (full, unsharded): resumable with any process count."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer(wrapped, optimizer, state: dict, error: type[NanoError]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    try:
        set_optimizer_state_dict(wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError) as e:
        raise error(f"the checkpoint's optimizer state does not fit this model ({str(e)[:120]}); "
                    "start a new run from its weights with --model") from None


def savable(model, wrapped, dist):
    """The model to write: itself (one process / DDP), or a full CPU copy gathered from FSDP shards.

    Under FSDP the gather is a collective: every rank calls this; only rank 0 gets the copy.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.initialized or hasattr(wrapped, "module"):
        return model
    from nanocli_model import NanoForCausalLM

    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.main:
        return None
    with torch.device("meta"):
        copy = NanoForCausalLM(model.config)
    copy.load_state_dict(full, assign=True)
    return copy


class Checkpointer:
    """``save(step, final)``: OUT/checkpoint-N (or OUT/final) with model, tokenizer files, training state."""

    def __init__(self, out: Path, model, wrapped, optimizer, dist, hparams: dict, files: Iterable[Path],
                 keep_last: int, status: Callable[[str], None], extra: Callable[[int], dict] | None = None):
        self.out, self.model, self.wrapped, self.optimizer, self.dist = out, model, wrapped, optimizer, dist
        self.hparams, self.files, self.keep_last, self.status = hparams, list(files), keep_last, status
        self.extra = extra or (lambda step: {})

    def __call__(self, step: int, final: bool) -> Path:
        rng = self.dist.all_gather_object(ckpt.rng_state())  # every process's generators, rank order
        state = {"step": step, "optimizer": optimizer_state(self.wrapped, self.optimizer), "rng": rng[0],
                 "rng_per_rank": rng, "world": self.dist.world, **self.extra(step)}
        path = self.out / (ckpt.FINAL if final else ckpt.checkpoint_name(step))
        model = savable(self.model, self.wrapped, self.dist)
        failure = None
        if self.dist.main:
            try:
                ckpt.save_checkpoint(path, model, state, self.hparams, self.files)
            except ckpt.CheckpointWriteError as e:
                failure = f"{e}; {self._last_good()}"
                if not self.dist.initialized:
                    raise ckpt.CheckpointWriteError(failure) from None
            else:
                ckpt.rotate(self.out, self.keep_last)
                self.status(f"saved {path}")
        failure = self.dist.broadcast_object(failure)  # every rank stops together (and waits for rank 0 here)
        if failure is not None:
            raise ckpt.CheckpointWriteError(failure)
        return path

    def _last_good(self) -> str:
        done = ckpt.list_checkpoints(self.out)
        if not done:
            return "no earlier checkpoint of this run exists"
        step, path = done[-1]
        return f"the last complete checkpoint, {path} (step {step}), is intact: --resume auto continues from it"


class Recorder:
    """Per-step metrics: ``metrics.jsonl`` (rank 0) and the UI hook; remembers the first loss."""

    def __init__(self, out: Path, dist, resumed_at: int | None, hook: Callable[[dict], None]):
        self.dist, self.hook = dist, hook
        self.log = MetricsLog(out / "metrics.jsonl", resume_step=resumed_at) if dist.main else None
        self.first_loss = float("nan")
        self._seen = False

    def __call__(self, m: dict) -> None:
        if "loss" in m and not self._seen:
            self.first_loss, self._seen = m["loss"], True
        if self.log is not None:
            self.log.write({**m, "time": time.time()})
        if self.dist.main:
            self.hook(m)

    def plot(self, out: Path, title: str) -> Path | None:
        if self.log is None:
            return None
        from ..plot import plot_loss

        rows = self.log.read()
        if not any("loss" in m for m in rows):
            return None
        return plot_loss(rows, out / "loss.png", title=title)


def restore_rng(state: dict, dist) -> None:
    """This process's RNG states from a checkpoint: its own rank's when the process count is unchanged,
    else rank 0's (training draws no random numbers today; the data order is a pure function of the step)."""
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    ckpt.set_rng_state(per_rank[dist.rank] if len(per_rank) == dist.world else state["rng"])


def peak_flops(peak_tflops: float | None, dist) -> float:
    """The device's peak FLOP/s for MFU: given, or the bf16 rate (fp16 on a card without bf16) of the GPU profile
    matching the device's name (``profiles.gpu_profile_for_device``); 0 = unknown."""
    if peak_tflops:
        return peak_tflops * 1e12
    if dist.device.type != "cuda":
        return 0.0
    from ..profiles import ProfileError, gpu_profile_for_device

    try:
        gpu = gpu_profile_for_device(torch.cuda.get_device_name(dist.device))
    except ProfileError:  # no GPU profiles: MFU unknown, training goes on
        return 0.0
    return 0.0 if gpu is None else gpu.tensor_tflops * 1e12


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
