"""THE one place that chooses between the mamba-ssm / causal-conv1d kernels and nano's own PyTorch code.

Layers call only ``ssd_scan``, ``ssd_step`` and ``causal_conv``. On CUDA tensors they run:

    scan  mamba-ssm's ``mamba_chunk_scan_combined`` (Triton)        prefill and training
    step  mamba-ssm's ``selective_state_update`` (Triton)           one decode token
    conv  causal-conv1d's ``causal_conv1d_fn`` / ``_update`` (CUDA)  prefill / decode

and everywhere else (CPU tensors, or a package that is missing) nano's pure-PyTorch implementation,
``cpu_fastpath.py``: hand-optimised for CPU, with hand-written backwards, and held by the tests to the readable
math in ``reference.py`` (which only lends ``discretize_dt`` to the running model). In ``status()`` and
``use()`` that pure-PyTorch path is called "reference". The two packages are independent: without causal-conv1d
the Triton scan still runs, with the PyTorch conv on the GPU. ``status()`` says which runs and why the others
do not; nothing falls back without saying so there.

How they are imported (lazily, on first use, so ``import nanocli_model`` works on any CPU box):
* mamba-ssm: only its Triton modules (``mamba_ssm.ops.triton.*``, pure Python) are used. Every release up to
  2.3.2.post1 imports its compiled Mamba-1 extension (``selective_scan_cuda``) in ``mamba_ssm/__init__.py``,
  which exists only after a full CUDA build (tens of minutes). So when ``mamba_ssm`` is not imported yet, it
  is registered as a bare package (its ``__path__`` only, ``__init__`` not run) and the Triton modules are
  imported from it: ``MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation
  mamba-ssm`` (seconds, no compiler) is enough. A ``mamba_ssm`` already imported is used as it is.
* causal-conv1d: its compiled extension, built for the GPU at hand (README "GPU").

Facts the calls rely on (mamba-ssm 2.3.2.post1, causal-conv1d 1.7.0):
* ``selective_state_update`` reads ``dt_bias.stride()`` unconditionally, so it always gets a ``dt_bias``
  tensor: nano passes dt already discretized (softplus and ``time_step_limit`` clamp, float32) with a
  zero, stride-0 ``dt_bias`` and ``dt_softplus=False``; with dt, A, D and dt_bias all stride-0 along
  head_dim the kernel takes its tied-head_dim path.
* The Triton kernels compute element offsets such as ``pid_b * stride_batch`` in 32-bit integers, and
  causal-conv1d keeps its strides as ``uint32``: an offset past 2**31 wraps silently (state-spaces/mamba
  #988, #1015). So every operand is made contiguous (a split view of the in_proj output would carry a batch
  stride of T x in_proj width) and calls are split along the batch, and if one row is still too large along
  time with the state carried over, so that no tensor a call indexes reaches ``INT32_LIMIT`` elements.
* causal-conv1d's ``initial_states`` / ``final_states`` need the channel-last layout (x (b, C, T) with
  stride 1 along C, C % 8 == 0): the cache keeps its conv state as a (b, C, K-1) view of a (b, K-1, C)
  buffer (``cache.py``), so a chunked prefill continues from the cached state on the kernel.

Force the pure-PyTorch path (``cpu_fastpath.py``, on any device) with ``NANO_KERNELS=reference`` in the
environment or ``with kernels.use("reference"):``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import cpu_fastpath, reference, row_gemv

_forced: str | None = None

INT32_LIMIT = 2**31  # elements: the kernels' offsets are 32-bit (see the module docstring)
MAMBA_SSM_TRITON = ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.selective_state_update")


# The SSD block decomposition is exact for any block length; ``chunk_size`` in the config is the
# CUDA kernels' tile. On CPU cpu_fastpath.ssd_chunked runs with its own block: every block computes a
# full (Q, Q) decay matrix of which half is masked (cost grows with Q), while the state-passing matmuls
# have inner dimension Q (too small a Q starves them). Measured on this CPU (docs/BENCHMARKS.md): Q = 32
# is fastest for state size <= 64, Q = 64 for state size 128 (the released models).
def cpu_ssd_block(state_size: int) -> int:
    return 32 if state_size <= 64 else 64


@contextlib.contextmanager
def use(backend: str) -> Iterator[None]:
    """Temporarily force ``"reference"`` (the pure-PyTorch ``cpu_fastpath``) or ``"auto"`` (kernels where available)."""
    global _forced
    if backend not in ("reference", "auto"):
        raise ValueError(f"kernel backend must be 'reference' or 'auto', got {backend!r}")
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


def _forced_reference() -> bool:
    return (_forced or os.environ.get("NANO_KERNELS", "auto")) == "reference"


def _on_kernel_device(t: torch.Tensor) -> bool:
    """Whether the kernels can take this tensor: a CUDA tensor. (The Triton-interpreter tests widen it.)"""
    return t.is_cuda


# ------------------------------------------------------------------------------------------ imports
def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def _bare_mamba_ssm() -> types.ModuleType | None:
    """``mamba_ssm`` as a package whose ``__init__`` is not run (see the module docstring); None if absent."""
    if "mamba_ssm" in sys.modules:
        return sys.modules["mamba_ssm"]
    spec = importlib.util.find_spec("mamba_ssm")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    pkg.__spec__ = spec
    pkg.__nano_bare__ = True  # nano's marker: __init__.py (the compiled Mamba-1 extension) was not run
    sys.modules["mamba_ssm"] = pkg
    return pkg


def _mamba_version(pkg: types.ModuleType) -> str:
    try:
        from importlib.metadata import version

        return version("mamba_ssm")
    except Exception:  # noqa: BLE001  (a source tree on sys.path has no metadata)
        return getattr(pkg, "__version__", "?")


@functools.lru_cache(maxsize=1)
def _ssd_ops() -> tuple[dict | None, str]:
    """({"scan", "step"} or None, version or the reason they are missing)."""
    try:
        pkg = _bare_mamba_ssm()
        if pkg is None:
            return None, "mamba-ssm not installed (README \"GPU\": MAMBA_SKIP_CUDA_BUILD=TRUE pip install ...)"
        combined, step = (importlib.import_module(name) for name in MAMBA_SSM_TRITON)
    except Exception as e:  # noqa: BLE001  (no triton, no einops, a broken install: say which)
        return None, f"mamba-ssm's Triton ops did not import: {_why(e)}"
    ops = {"scan": combined.mamba_chunk_scan_combined, "step": step.selective_state_update}
    return ops, f"mamba-ssm {_mamba_version(pkg)} (Triton)"


@functools.lru_cache(maxsize=1)
def _conv_ops() -> tuple[dict | None, str]:
    """({"fn", "update"} or None, version or the reason they are missing)."""
    try:
        import causal_conv1d
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception as e:  # noqa: BLE001  (ImportError, or a build for another GPU / torch: undefined symbol)
        return None, f"causal-conv1d not importable ({_why(e)})"
    version = getattr(causal_conv1d, "__version__", "?")
    return {"fn": causal_conv1d_fn, "update": causal_conv1d_update}, f"causal-conv1d {version}"


def _reset_imports() -> None:
    """Forget what was imported (tests that install or stub the packages call this)."""
    _ssd_ops.cache_clear()
    _conv_ops.cache_clear()


# ------------------------------------------------------------------------------------------ status
@dataclass(frozen=True)
class KernelStatus:
    """Which implementation runs each op on one device, and why the others do not."""

    device: str  # "cuda" | "cpu" | ...
    ssd: str  # scan + step: "mamba-ssm 2.3.2.post1 (Triton)" or "reference"
    conv: str  # "causal-conv1d 1.7.0" or "reference"
    missing: tuple[str, ...]  # one reason per kernel package that does not run here

    @property
    def label(self) -> str:
        """Short: ``mamba-ssm+causal-conv1d``, ``mamba-ssm`` (conv in PyTorch) or ``reference``."""
        names = [n for n, v in (("mamba-ssm", self.ssd), ("causal-conv1d", self.conv)) if v != "reference"]
        return "+".join(names) or "reference"

    def describe(self) -> str:
        """One line for the stats line, ``nano info`` and benchmark headers."""
        scan = f"scan/step {self.ssd}" if self.ssd != "reference" else "scan/step pure PyTorch"
        conv = f"conv {self.conv}" if self.conv != "reference" else "conv pure PyTorch"
        why = f" ({'; '.join(self.missing)})" if self.missing else ""
        return f"kernels: {scan}, {conv}{why}"


def status(device: str | torch.device = "cuda") -> KernelStatus:
    """What ``ssd_scan`` / ``ssd_step`` / ``causal_conv`` run on tensors of ``device``, with the reasons."""
    kind = torch.device(device).type
    if _forced_reference():
        return KernelStatus(kind, "reference", "reference", ("forced by NANO_KERNELS=reference or kernels.use",))
    if kind != "cuda" and not _on_kernel_device(torch.empty(0, device=device)):
        return KernelStatus(kind, "reference", "reference", (f"the kernels run on CUDA tensors, not {kind}",))
    (ssd, ssd_info), (conv, conv_info) = _ssd_ops(), _conv_ops()
    missing = tuple(info for ops, info in ((ssd, ssd_info), (conv, conv_info)) if ops is None)
    return KernelStatus(kind, ssd_info if ssd else "reference", conv_info if conv else "reference", missing)


def backend_for(t: torch.Tensor) -> str:
    """``"cuda"`` when the mamba-ssm scan/step kernels run on this tensor, else ``"reference"``."""
    return "cuda" if _use_ssd(t) else "reference"


def _use_ssd(t: torch.Tensor) -> bool:
    return not _forced_reference() and _on_kernel_device(t) and _ssd_ops()[0] is not None


def _use_conv(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor | None) -> bool:
    """causal-conv1d takes channel-last inputs with C % 8 == 0, kernel widths 2-4, and a channel-last state."""
    if _forced_reference() or not _on_kernel_device(x) or _conv_ops()[0] is None:
        return False
    C, K = weight.shape
    return C % 8 == 0 and 2 <= K <= 4 and (conv_state is None or conv_state.stride(1) == 1)


# ------------------------------------------------------------------------------------------ 32-bit guard
def batch_pieces(batch: int, row: int, limit: int | None = None) -> list[slice]:
    """Batch slices of at most ``(limit - 1) // row`` rows each, so that no call's tensor of ``row``
    elements per batch row reaches ``limit`` (default ``INT32_LIMIT``) elements (at least one row a slice)."""
    limit = INT32_LIMIT if limit is None else limit
    step = max(1, (limit - 1) // max(row, 1))
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


def time_pieces(length: int, per_token: int, multiple: int, limit: int | None = None) -> list[slice]:
    """Time slices (multiples of ``multiple`` tokens, the last one shorter) whose ``per_token``-wide rows stay
    below ``limit`` (default ``INT32_LIMIT``) elements; one slice when the whole length already does."""
    limit = INT32_LIMIT if limit is None else limit
    if length * per_token < limit:
        return [slice(0, length)]
    step = max(multiple, (limit - 1) // per_token // multiple * multiple)
    return [slice(i, min(i + step, length)) for i in range(0, length, step)]


def scan_row_elements(T: int, H: int, P: int, G: int, N: int, chunk: int) -> int:
    """The largest per-batch-row extent among the tensors ``mamba_chunk_scan_combined`` indexes: x and the
    output (T H P), B and C (T G N), the chunk states (ceil(T/Q) H P N), C^T B (ceil(T/Q) G Q Q) and the
    float32 dt / cumulative sums (H ceil(T/Q) Q)."""
    nc = -(-T // chunk)
    return max(T * H * P, T * G * N, nc * H * P * N, nc * G * chunk * chunk, H * nc * chunk)


# ------------------------------------------------------------------------------------------ the ops
def ssd_scan(x, dt_raw, dt_bias, A, B, C, D, chunk_size, dt_limit, initial_state=None):
    """Prefill / training scan. x (b,T,H,P); dt_raw (b,T,H) before softplus; A, D, dt_bias (H,);
    B, C (b,T,G,N); initial_state (b,H,P,N) or None. Returns y (b,T,H,P) float32, final state float32."""
    if _use_ssd(x):
        return _scan_kernel(x, dt_raw, dt_bias, A, B, C, D, chunk_size, dt_limit, initial_state)
    dt = reference.discretize_dt(dt_raw, dt_bias, dt_limit)
    block = min(chunk_size, cpu_ssd_block(B.shape[-1])) if x.device.type == "cpu" else chunk_size
    return cpu_fastpath.ssd_chunked(x, dt, A, B, C, block, D=D, initial_state=initial_state)


def _scan_kernel(x, dt_raw, dt_bias, A, B, C, D, chunk_size, dt_limit, initial_state):
    """``mamba_chunk_scan_combined`` on contiguous operands, in pieces that keep its offsets in 32 bits."""
    scan = _ssd_ops()[0]["scan"]
    b, T, H, P = x.shape
    G, N = B.shape[-2:]
    x, dt_raw, B, C = (t.contiguous() for t in (x, dt_raw, B, C))  # batch strides of their own, not in_proj's
    per_token = scan_row_elements(chunk_size, H, P, G, N, chunk_size) // chunk_size  # per token, whole chunks
    times = time_pieces(T, per_token, chunk_size)
    rows = batch_pieces(b, scan_row_elements(times[0].stop, H, P, G, N, chunk_size))
    ys, finals = [], []
    for r in rows:
        state = None if initial_state is None else initial_state[r]
        parts = []
        for t in times:  # one piece unless a single row is past 2**31 elements: the state carries over
            y, state = scan(x[r, t], dt_raw[r, t], A, B[r, t], C[r, t], chunk_size, D=D, dt_bias=dt_bias,
                            initial_states=state, dt_softplus=True, dt_limit=tuple(dt_limit),
                            return_final_states=True)
            parts.append(y)
        ys.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        finals.append(state)
    y = ys[0] if len(ys) == 1 else torch.cat(ys)  # (b, T, H, P)
    final = finals[0] if len(finals) == 1 else torch.cat(finals)  # (b, H, P, N)
    return y.float(), final.float()


def ssd_step(state, x, dt_raw, dt_bias, A, B, C, D, dt_limit):
    """Decode one token; updates ``state`` (b,H,P,N) in place. x (b,H,P); dt_raw (b,H); B, C (b,G,N).
    Returns y (b,H,P) float32."""
    dt = reference.discretize_dt(dt_raw, dt_bias, dt_limit)  # (b, H) float32, clamp included
    if not _use_ssd(x):
        if torch.compiler.is_compiling() and row_gemv.ssm_usable(state, x, dt, A, B, C, D):
            # inside a compiled CPU decode step: nano's kernel reads and writes the state once (row_gemv.ssm_step)
            return torch.ops.nano.ssm_step(state, x, dt, A, B, C, D)
        return cpu_fastpath.ssd_step(state, x, dt, A, B, C, D)
    step = _ssd_ops()[0]["step"]
    b, H, P = x.shape
    N = state.shape[-1]
    # Per-(head, channel) parameters tied across head_dim by stride-0 views (the kernel's TIE_HDIM path);
    # dt is final here, so the kernel adds a zero bias and applies no softplus.
    dt_hp = dt[..., None].expand(b, H, P)  # (b, H, P), stride 0 along P
    A_hpn = A.float()[:, None, None].expand(H, P, N)  # (H, P, N), stride 0 along P and N
    D_hp = None if D is None else D[:, None].expand(H, P)  # (H, P)
    zero_bias = dt.new_zeros(()).expand(H, P)  # (H, P), stride (0, 0)
    ys = []
    for r in batch_pieces(b, H * P * N):  # the state's rows are the largest per-row extent
        y = step(state[r], x[r], dt_hp[r], A_hpn, B[r], C[r], D=D_hp, dt_bias=zero_bias, dt_softplus=False)
        ys.append(y)
    y = ys[0] if len(ys) == 1 else torch.cat(ys)
    return y.float()


def causal_conv(x, weight, bias, conv_state=None):
    """Depthwise causal conv + SiLU. x (b,T,C) channels last; weight (C,K); conv_state (b,C,K-1) updated
    in place. Returns (b,T,C)."""
    if not _use_conv(x, weight, conv_state):
        return cpu_fastpath.causal_conv1d(x, weight, bias, conv_state)
    ops = _conv_ops()[0]
    b, T, C = x.shape
    if conv_state is not None and T == 1:  # decode: the update kernel shifts the state in place
        return ops["update"](x.reshape(b, C), conv_state, weight, bias, activation="silu").unsqueeze(1)
    x = x.contiguous()  # (b, T, C): its transpose is the channel-last (b, C, T) layout the kernel takes
    outs = []
    for r in batch_pieces(b, T * C):
        state = None if conv_state is None else conv_state[r]  # (rows, C, K-1) channel-last view
        parts = []
        for t in time_pieces(T, C, 1):
            xt = x[r, t].transpose(1, 2)  # (rows, C, t) channel-last
            if state is None and conv_state is None and t.stop == T:  # training / no cache: no states at all
                parts.append(ops["fn"](xt, weight, bias, activation="silu"))
                continue
            out, state = ops["fn"](xt, weight, bias, initial_states=state, return_final_states=True,
                                   activation="silu")  # final states: a fresh (rows, C, K-1) channel-last tensor
            parts.append(out)
        if conv_state is not None:
            conv_state[r].copy_(state)  # not written by the kernel itself: it reads the initial state from there
        outs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)  # (b, C, T) channel-last
    return out.transpose(1, 2)  # (b, T, C)
