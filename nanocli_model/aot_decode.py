"""The decode step compiled ahead of time and kept on disk: what ``nano generate`` decodes with on CPU.

``decode.CompiledDecode`` (``torch.compile``) makes a CPU decode step 1.7-2.1x faster, but every process pays
its compile again (4-8 s with a warm inductor cache, 12-50 s cold: dynamo traces the model twice, for a fixed
then a symbolic cache position) and every step pays dynamo's guards and Python wrapper. ``AotDecode`` instead
exports the one-token forward once (``torch.export``, the cache position and the KV length symbolic) and
compiles it with AOTInductor into a shared library without the weights: a ``.pt2`` package in a directory,
keyed by what the compiled code depends on (``artefact_key``: nano's model code, the config, batch, dtypes,
torch version, CPU instruction set, thread count). A later run with a model of the same shape loads it in
milliseconds and hands it the model's own weight tensors (no copy); the step is C++ from end to end.

The step itself is the model's own forward, as ``CompiledDecode`` traces it: projections through nano's own
GEMVs where its kernel library is available (``row_gemv``: the library calls their C shims directly; rows
shorter than ``layers.ROW_GEMV_MIN_IN`` as inductor's row-wise dot product), the element-wise work fused, the
weights row-major in a huge-page arena (``decode.relayout_linear_weights``). int8 models (``quant.Int8Linear``)
compile too when their int8 GEMVs are nano's (``supported``). Multi-token calls (prefill) run the eager model.
The first compile of a shape takes about as long as ``torch.compile``'s cold compile; the package is written to
a temporary name and renamed, so a killed compile leaves nothing half-written. An unreadable package is
compiled again; where nothing can be compiled (no C++ compiler, an export that fails) the steps run eagerly
and ``fallback_reason`` says why, in one line.

A directory keeps the ``KEEP_PACKAGES`` most recently used packages (``prune``, after each compile; loading a
package marks it used) and drops temporary packages a killed compile left.

Loading a package runs the shared library it holds (as ``torch.compile`` runs the libraries in its own
on-disk cache): keep the directory as private as the inductor cache (``~/.cache/nano/decode`` by default).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import mark_used, prune_kept, row_gemv
from .cache import AttentionCache, HybridCache, MambaCache
from .decode import compile_failure_line, relayout_linear_weights

FORMAT = 1  # bump when the package's inputs or their meaning change
MIN_POSITIONS = 2  # export treats a dimension of size 0 or 1 as a constant: a step sees >= 1 cached token
MAX_LEN = 1 << 24
KEEP_PACKAGES = 16  # the most recently used packages a directory keeps (a shape each: a few MB for medium)


@functools.cache
def code_digest() -> str:
    """sha256 of nano's model code (every ``nanocli_model/*.py``): the compiled step is traced from it."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def inductor_options() -> dict:
    """AOTInductor options of the package: weights left out of the library (the model's own are handed over
    at load), ``CompiledDecode``'s choice to store, not recompute, the normed GEMV inputs, and, where nano's
    GEMV library is available, direct calls into it (``row_gemv.aot_options``)."""
    from torch._inductor import config as inductor_config

    options = {"aot_inductor.package_constants_in_so": False, "aot_inductor.use_runtime_constant_folding": True}
    if hasattr(inductor_config, "realize_cpu_opcount_threshold"):
        options["realize_cpu_opcount_threshold"] = 4
    if row_gemv.available():
        options.update(row_gemv.aot_options())
    return options


def supported(model: nn.Module) -> str | None:
    """None when ``AotDecode`` can run ``model``, else why not (one line): float32 weights, or an int8 model
    (``quant.Int8Linear``) whose int8 GEMVs are nano's own (``row_gemv``; fbgemm's packed matrices cannot be
    handed to a compiled library)."""
    if model.lm_head.weight.device.type != "cpu":
        return "ahead-of-time decode is built for CPU"
    floats = {p.dtype for p in model.parameters()}
    if floats != {torch.float32}:
        return f"ahead-of-time decode is built for float32 weights, not {', '.join(sorted(map(str, floats)))}"
    int8 = [m for m in model.modules() if type(m).__name__ == "Int8Linear"]
    if int8 and (not row_gemv.available() or any(m._packed is not None for m in int8)):
        return f"ahead-of-time decode of int8 weights needs nano's CPU GEMV library ({row_gemv.reason() or 'unused'})"
    return None


def artefact_key(model: nn.Module, cache: HybridCache) -> str:
    """Hex digest naming the package that decodes ``model`` with ``cache``'s batch, padding and dtypes."""
    fields = {
        "format": FORMAT, "torch": torch.__version__, "code": code_digest(), "config": model.config.to_dict(),
        "batch": cache.batch, "padded": cache.pad_len is not None,
        "cache_dtypes": sorted({str(t.dtype) for t in cache.tensors()}),
        "weights": sorted({str(t.dtype) for t in (*model.parameters(), *model.buffers())}),
        "cpu": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
        "cpu_model": row_gemv.cpu_digest(),
        "threads": torch.get_num_threads(), "options": {k: str(v) for k, v in inductor_options().items()},
        "row_gemv": row_gemv.source_digest() if row_gemv.available() else None,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


class _Step(nn.Module):
    """``forward(ids, positions, [pad,] *cache tensors) -> logits``: the model's one-token forward on a
    ``HybridCache`` rebuilt around the given tensors; the cache position is ``positions.shape[0] - 1``."""

    def __init__(self, model: nn.Module, kinds: list[str], padded: bool):
        super().__init__()
        self.model, self.kinds, self.padded = model, kinds, padded

    def forward(self, ids, positions, *rest):
        pad, tensors = (rest[0], rest[1:]) if self.padded else (None, rest)
        layers, it = [], iter(tensors)
        for kind in self.kinds:
            layers.append(AttentionCache(next(it), next(it)) if kind == "attention"
                          else MambaCache(next(it), next(it)) if kind == "mamba" else None)
        # max_len: the caller's HybridCache.begin checked the real bound before the call
        cache = HybridCache(batch=ids.shape[0], max_len=MAX_LEN, layers=layers, seq_len=positions.shape[0] - 1,
                            pad_len=pad)
        return self.model(ids, cache)


def _allocated_layout(cache: HybridCache) -> bool:
    """Whether every cache tensor has ``HybridCache.allocate``'s layout: K, V and the SSM state contiguous, the
    conv window a transposed view of a contiguous (b, K-1, conv_dim) buffer."""
    for layer in cache.layers:
        if isinstance(layer, AttentionCache) and not (layer.k.is_contiguous() and layer.v.is_contiguous()):
            return False
        if isinstance(layer, MambaCache) and not (layer.ssm.is_contiguous()
                                                  and layer.conv.transpose(1, 2).is_contiguous()):
            return False
    return True


def _kinds(cache: HybridCache) -> list[str]:
    return ["attention" if isinstance(layer, AttentionCache) else "mamba" if isinstance(layer, MambaCache)
            else "none" for layer in cache.layers]


def prune(directory: Path, keep: int = KEEP_PACKAGES) -> list[Path]:
    """Delete all but the ``keep`` most recently used packages in ``directory``, and temporary packages a killed
    compile left (older than a day); the paths deleted. A process that loaded a package has its library
    already; one about to load a deleted package compiles it again."""
    return prune_kept(directory, "decode", ".pt2", keep)


class AotDecode:
    """``step(input_ids (b, 1), cache) -> logits (b, 1, V)`` through an ahead-of-time compiled package, loaded
    from ``directory`` or compiled into it at the first one-token step of each (batch, padding).

    Like ``CompiledDecode`` it puts the Linear weights back in row-major order and keeps them so, and the
    model must not change while this object is in use (the package reads the model's own tensors).
    ``compile_seconds``: wall time spent loading or compiling packages (not decoding); ``loaded`` /
    ``built``: how many packages came from the directory / were compiled here. ``directory`` None: a fresh
    temporary directory. The cache must be laid out as ``HybridCache.allocate`` makes it (the library reads its
    tensors with those strides); another layout decodes eagerly, with the reason in ``fallback_reason``.
    """

    def __init__(self, model: nn.Module, directory: str | Path | None = None,
                 on_compile: Callable[[], None] | None = None):
        self.model, self.on_compile = model, on_compile  # on_compile: called before a compile (tens of seconds)
        self.fallback_reason = supported(model)
        self.directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="nano-aot-"))
        self.calls, self.compile_seconds, self.loaded, self.built = 0, 0.0, 0, 0
        self.notes: list[str] = []  # e.g. an unreadable package compiled again
        self._runners: dict[tuple[int, bool], object] = {}
        self._constants: list[dict[str, torch.Tensor]] = []  # what each runner reads (user-managed: kept alive here)
        self._positions = torch.empty(0)
        if self.fallback_reason is None:
            relayout_linear_weights(model, column_major_tall=False)
            model._decode_layout_done = True  # stays row-major, as the package was compiled for

    @property
    def compiled(self) -> bool:
        return self.fallback_reason is None

    def __call__(self, input_ids: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        if input_ids.shape[1] != 1 or self.fallback_reason is not None or cache.seq_len + 1 < MIN_POSITIONS:
            return self.model(input_ids, cache)
        key = (input_ids.shape[0], cache.pad_len is not None)
        runner = self._runners.get(key)
        if runner is None:
            runner = self._runners[key] = self._prepare(cache)
            if runner is None:
                return self.model(input_ids, cache)
        start = cache.begin(1, input_ids.shape[0])  # the eager model's checks: batch, a full cache
        if self._positions.shape[0] < cache.max_len:
            self._positions = torch.empty(cache.max_len, dtype=torch.int8)
        # the library reads its inputs with the strides and dtypes it was compiled for (no checks):
        # the token column may be a strided slice of a larger buffer
        ids = input_ids.to(torch.long).contiguous()
        pad = () if cache.pad_len is None else (cache.pad_len.to(torch.long).contiguous(),)
        logits = runner(ids, self._positions[:start + 1], *pad, *cache.tensors())  # the one output
        cache.commit()
        self.calls += 1
        return logits

    # ------------------------------------------------------------------------------------------ packages
    def _prepare(self, cache: HybridCache):
        """The runner for ``cache``'s batch and padding: loaded, else compiled and saved; None on failure."""
        if not _allocated_layout(cache):
            self.fallback_reason = "the cache is not laid out as HybridCache.allocate makes it; running eager"
            return None
        t = time.perf_counter()
        path = self.directory / f"decode-{artefact_key(self.model, cache)}.pt2"
        try:
            runner = None
            if path.is_file():
                try:
                    runner = self._load(path)
                    self.loaded += 1
                    mark_used(path)
                except Exception as e:  # a truncated or foreign file: compile it again
                    why = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)[:200]
                    self.notes.append(f"compiled decode step {path} unreadable ({why}): compiled again")
            if runner is None:
                if self.on_compile is not None:
                    self.on_compile()
                self._compile(cache, path)
                runner = self._load(path)
                self.built += 1
        except Exception as e:
            self.fallback_reason = compile_failure_line(e)
            return None
        finally:
            self.compile_seconds += time.perf_counter() - t
        return runner

    def _load(self, path: Path):
        row_gemv.library()  # a library compiled to call nano's GEMVs finds them in it (loaded RTLD_GLOBAL)
        runner = torch._inductor.aoti_load_package(str(path))
        tensors = {f"model.{name}": t for name, t in self.model.named_parameters(remove_duplicate=False)}
        tensors.update((f"model.{name}", t) for name, t in self.model.named_buffers(remove_duplicate=False))
        # the model's own tensors; "_FOLDED_CONST_*" (e.g. -exp(A_log)) the library computes from them at load
        names = [n for n in runner.get_constant_fqns() if not n.startswith("_FOLDED_CONST_")]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"the package reads {missing[0]}, which this model does not have")
        read = {id(tensors[n]) for n in names}  # a tied weight is read under either of its names
        unread = [n for n, t in tensors.items() if id(t) not in read]
        if unread:  # it would decode with the compiling model's values of these
            raise ValueError(f"the package holds its own copy of {unread[0]}; compile with runtime constant folding")
        self._constants.append({n: tensors[n] for n in names})
        runner.load_constants(self._constants[-1], check_full_update=True, user_managed=True)
        return runner

    def _compile(self, cache: HybridCache, path: Path) -> None:
        """Export the one-token step on a scratch cache like ``cache`` (KV length and position symbolic) and
        compile it into ``path`` (written under a temporary name, then renamed)."""
        from torch.export import Dim

        c = self.model.config
        kinds = _kinds(cache)
        dtype = next((t.dtype for t in cache.tensors()), torch.float32)
        ssm = next((layer.ssm.dtype for layer in cache.layers if isinstance(layer, MambaCache)), None)
        with torch.inference_mode(False), torch.no_grad():
            scratch = HybridCache.allocate(c, cache.batch, 8, dtype=dtype, ssm_dtype=ssm)
            positions = torch.empty(3, dtype=torch.int8)  # cache position 2 of a scratch KV length 8
            pad = () if cache.pad_len is None else (torch.zeros(cache.batch, dtype=torch.long),)
            ids = torch.zeros(cache.batch, 1, dtype=torch.long)
            P, L = Dim("positions", min=MIN_POSITIONS, max=MAX_LEN), Dim("kv_len", min=3, max=MAX_LEN)
            shapes = tuple({2: L} if kind == "attention" else None for kind in kinds for _ in range(2)
                           if kind != "none")
            program = torch.export.export(
                _Step(self.model, kinds, cache.pad_len is not None), (ids, positions, *pad, *scratch.tensors()),
                dynamic_shapes=(None, {0: P}, ((None,) if pad else ()) + shapes), strict=False)
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")
            try:
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                                         inductor_configs=inductor_options())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        prune(self.directory)
