"""nano's own CPU decode kernels (``csrc/row_gemv.cpp``, ``csrc/decode_attention.cpp``, ``csrc/ssm_step.cpp``),
built once per machine into one library, as five torch ops: two GEMVs, the decode attention (plain and
left-padded) and the Mamba-2 state update.

Decode on a CPU streams every weight once per token, so a token's time is the time of its matrix-vector
products. Inductor's row-wise dot product and MKL's GEMV both read the decode shapes below the memory's rate
(docs/BENCHMARKS.md); ``csrc/row_gemv.cpp`` reads eight weight rows side by side with AVX2 FMAs, or, for one
row of x on an AVX-512 CPU, one weight row at a time (a single sequential stream). The ops:

* ``torch.ops.nano.row_gemv_f32(x, W)``: ``x @ W.T``, W (out, in) float32 row-major.
* ``torch.ops.nano.row_gemv_q8(x, Q, scale)``: ``(x @ Q.T) * scale``, Q (out, in) int8 row-major, scale (out,)
  float32: int8 weights times a 16-bit rounding of x per row (weight-only int8 to within 2e-5 of x's largest
  entry), multiplied and summed in integers (``vpmaddwd``).
* ``torch.ops.nano.decode_attention(q, k, v)``: ``softmax(q k^T / sqrt(d)) v`` for one new token, q (b, kv, R, d)
  the R query heads that read each KV head, k and v (b, kv, L, d) views of the cache, read in one pass (SDPA
  took 1.8-2.2x as long from 2k cached tokens up: docs/BENCHMARKS.md). ``decode_attention_padded(q, k, v, pad)``:
  the same for a left-padded batch, row b skipping its first ``pad[b]`` keys.
* ``torch.ops.nano.ssm_step(state, x, dt, A, B, C, D)``: one token of the Mamba-2 recurrence (``reference.ssd_step``
  with dt already discretized), the float32 state (b, H, P, N) updated in place in one pass: each state row read
  once, written once and dotted with C while in registers (inductor's fused update wrote a temporary, copied it
  into the cache and read it again).

x is float32 (..., in); the result float32 (..., out). Eager calls go through ctypes; the ahead-of-time decode
step (``aot_decode.AotDecode``) calls the library's C shims (``aoti_torch_cpu_row_gemv_*``,
``aoti_torch_cpu_decode_attention[_padded]``, ``aoti_torch_cpu_ssm_step``) directly, through
inductor's ``aot_inductor.custom_ops_to_c_shims`` (``aot_options``).

The library is compiled with the C++ compiler inductor uses (``$CXX``, else g++), ``-O3 -march=native``,
against AOTInductor's C shim header only (a few seconds), into ``<cache dir>/kernels/row_gemv-<key>.so`` (a
temporary name, then renamed), the key hashing the sources, torch version, compiler and CPU; a build deletes all
but the ``KEEP_LIBRARIES`` most recently used libraries there. ``available()``
is False where it cannot be built or loaded (no compiler, not x86-64/Linux...), or under
``NANO_ROW_GEMV=0``; ``reason()`` says why, and callers then use inductor's / MKL's GEMV as before. A library
file that is not what its build wrote (its sha256 is recorded beside it) is built again, never loaded. Like inductor's own cache, the directory holds code this process runs: keep it as
private as the rest of ``<cache dir>``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from . import cache_home, mark_used, prune_kept

SOURCE = Path(__file__).parent / "csrc" / "row_gemv.cpp"
SOURCES = (SOURCE, SOURCE.with_name("decode_attention.cpp"), SOURCE.with_name("ssm_step.cpp"))  # one library
ENV = "NANO_ROW_GEMV"
KEEP_LIBRARIES = 8  # the most recently used builds <cache dir>/kernels keeps (each source, torch, compiler, CPU)

_reason: str | None = None
_enabled = True  # use(False) turns the ops off for a comparison in one process


def compiler() -> str | None:
    """The C++ compiler inductor compiles with on Linux (``$CXX``, else g++: ``torch._inductor.config.cpp.cxx``),
    as a path, or None. This library is built with it, and ``nano generate`` compiles by default only if it is
    there."""
    return shutil.which(os.environ.get("CXX") or "g++")


@functools.cache
def cpu_digest() -> str:
    """The CPU's model name and feature flags (Linux), as a digest: code compiled with ``-march=native`` (this
    library, inductor's) may not run on another CPU of the same instruction-set level."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return hashlib.sha256("\n".join(sorted(set(lines))).encode()).hexdigest()[:16]


@functools.cache
def source_digest() -> str:
    """sha256 of the kernel sources: part of every compiled decode step's key that calls them."""
    return hashlib.sha256(b"\0".join(path.read_bytes() for path in SOURCES)).hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(path: Path) -> bool:
    """Whether ``path`` is the library its build wrote: its sha256 matches the one recorded beside it (a damaged
    shared library can crash the process that loads it, so it is checked before ``dlopen``)."""
    digest = path.with_suffix(".sha256")
    try:
        return path.is_file() and digest.read_text().strip() == _file_digest(path)
    except OSError:
        return False


def compile_command(cxx: str, out: Path, *flags: str) -> list[str]:
    """The command that builds the library into ``out``; ``flags`` go after ``-march=native`` (the tests build
    the AVX2 form on an AVX-512 CPU with ``-mno-avx512f``)."""
    torch_dir = Path(torch.__file__).parent
    return [cxx, "-O3", "-march=native", *flags, "-std=c++17", "-shared", "-fPIC", f"-I{torch_dir / 'include'}",
            *map(str, SOURCES), f"-L{torch_dir / 'lib'}", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(out)]


def _build(cxx: str) -> Path:
    """The library for this source, torch, compiler and CPU: the one already built, else built now (a temporary
    name, then renamed; its sha256 recorded beside it first)."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout.split("\n")[0]
    key = hashlib.sha256("\0".join([source_digest(), torch.__version__, version, cpu_digest(),
                                    platform.machine()]).encode()).hexdigest()[:24]
    path = cache_home() / "kernels" / f"row_gemv-{key}.so"
    if _intact(path):
        mark_used(path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.so")
    tmp_digest = tmp.with_suffix(".sha256")
    try:
        done = subprocess.run(compile_command(cxx, tmp), capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "")
            raise RuntimeError(f"{Path(cxx).name} failed: {last[:200]}")
        tmp_digest.write_text(_file_digest(tmp) + "\n")
        os.replace(tmp_digest, path.with_suffix(".sha256"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_digest.unlink(missing_ok=True)
    for old in prune_kept(path.parent, "row_gemv", ".so", KEEP_LIBRARIES):  # other sources, torch versions, CPUs
        old.with_suffix(".sha256").unlink(missing_ok=True)
    return path


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built first if needed), or None; ``reason()`` then says why."""
    global _reason
    _reason = None
    if os.environ.get(ENV, "1") == "0":
        _reason = f"{ENV}=0"
        return None
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        _reason = f"built for x86-64 Linux, not {sys.platform} {platform.machine()}"
        return None
    cxx = compiler()
    if cxx is None:
        _reason = "no C++ compiler (set CXX or install g++)"
        return None
    try:
        # global: the ahead-of-time decode libraries resolve aoti_torch_cpu_row_gemv_* from it when loaded
        lib = ctypes.CDLL(str(_build(cxx)), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _reason = f"the CPU GEMV library did not build: {str(e).splitlines()[0][:200]}"
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.nano_row_gemv_f32.argtypes = [p, i64, i64, p, i64, i64, p]
    lib.nano_row_gemv_f32.restype = None
    lib.nano_row_gemv_q8.argtypes = [p, i64, i64, p, p, i64, i64, p]
    lib.nano_row_gemv_q8.restype = None
    lib.nano_decode_attention_f32.argtypes = [p, p, i64, i64, i64, p, i64, i64, i64, i64, i64, i64, i64, i64,
                                              ctypes.c_float, p, p]
    lib.nano_decode_attention_f32.restype = ctypes.c_int
    lib.nano_ssm_step_f32.argtypes = [p, p, i64, p, i64, p, p, i64, p, i64, p, i64, i64, i64, i64, i64, p]
    lib.nano_ssm_step_f32.restype = ctypes.c_int
    lib.nano_row_gemv_f32_one_row_loop.argtypes = []
    lib.nano_row_gemv_f32_one_row_loop.restype = ctypes.c_int
    return lib


@torch.compiler.assume_constant_result  # dynamo takes the answer at trace time instead of tracing ctypes
def available() -> bool:
    return _enabled and library() is not None


@torch.compiler.assume_constant_result
def one_row_loop() -> bool:
    """Whether ``row_gemv_f32`` reads one weight row at a time for a single row of x (built with AVX-512): then
    it is faster than inductor's fused row-dot loop on shorter rows too (``layers.project``)."""
    return available() and bool(library().nano_row_gemv_f32_one_row_loop())


@contextlib.contextmanager
def use(enabled: bool):
    """``with row_gemv.use(False):`` compiled decode steps built inside use inductor's / MKL's GEMVs (A/B runs)."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


def reason() -> str | None:
    """Why the kernels are not used (one line), or None when they are."""
    library()
    return _reason if _enabled else "turned off (row_gemv.use(False))"


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``row_gemv_*`` can take this call: CPU, float32 x, a row-major 2-D weight, the library loaded."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.device.type == "cpu"
            and weight.dim() == 2 and weight.stride() == (weight.shape[1], 1) and available())


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


@torch.library.custom_op("nano::row_gemv_f32", mutates_args=())
def row_gemv_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` through ``nano_row_gemv_f32``: x (..., in) float32, weight (out, in) row-major."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"nano's CPU GEMV library is not available: {reason()}")
    if weight.dtype != torch.float32 or weight.stride() != (weight.shape[1], 1) or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"row_gemv_f32 takes x (..., {weight.shape[1]}) and a row-major float32 weight, "
                         f"got {tuple(x.shape)} and {weight.dtype} {tuple(weight.shape)} strides {weight.stride()}")
    rows = _rows(x.float())
    y = torch.empty(rows.shape[0], weight.shape[0])
    lib.nano_row_gemv_f32(rows.data_ptr(), rows.shape[1], rows.shape[0], weight.data_ptr(), weight.shape[0],
                          weight.shape[1], y.data_ptr())
    return y.view(*x.shape[:-1], weight.shape[0])


@row_gemv_f32.register_fake
def _row_gemv_f32_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


@torch.library.custom_op("nano::row_gemv_q8", mutates_args=())
def row_gemv_q8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x @ q.T) * scale`` through ``nano_row_gemv_q8``: q (out, in) int8 row-major, scale (out,) float32."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"nano's CPU GEMV library is not available: {reason()}")
    if (q.dtype != torch.int8 or q.stride() != (q.shape[1], 1) or x.shape[-1] != q.shape[1]
            or scale.shape != (q.shape[0],) or scale.dtype != torch.float32 or not scale.is_contiguous()):
        raise ValueError(f"row_gemv_q8 takes x (..., {q.shape[1]}), a row-major int8 q and a float32 scale per "
                         f"row, got {tuple(x.shape)}, {q.dtype} {tuple(q.shape)}, {scale.dtype} {tuple(scale.shape)}")
    rows = _rows(x.float())
    y = torch.empty(rows.shape[0], q.shape[0])
    lib.nano_row_gemv_q8(rows.data_ptr(), rows.shape[1], rows.shape[0], q.data_ptr(), scale.data_ptr(), q.shape[0],
                         q.shape[1], y.data_ptr())
    return y.view(*x.shape[:-1], q.shape[0])


@row_gemv_q8.register_fake
def _row_gemv_q8_fake(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], q.shape[0]), dtype=torch.float32)


DECODE_ATTENTION_MAX_D = 256  # the longest head the kernel takes (csrc/decode_attention.cpp's MAX_D)


def _pad_usable(pad: torch.Tensor, batch: int) -> bool:
    return (pad.device.type == "cpu" and pad.dtype == torch.int64 and pad.dim() == 1 and pad.shape[0] == batch
            and (batch == 1 or pad.stride(0) == 1))


def attention_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None = None) -> bool:
    """Whether ``decode_attention`` (``decode_attention_padded`` with ``pad``) can take this call: CPU float32
    (b, heads, R, d) q and (b, heads, L, d) k, v with unit stride along d, d at most DECODE_ATTENTION_MAX_D, pad
    (b,) int64 contiguous, the library loaded."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4 and t.stride(-1) == 1
                for t in (q, k, v))
            and q.shape[-1] <= DECODE_ATTENTION_MAX_D and (pad is None or _pad_usable(pad, q.shape[0]))
            and available())


@torch.library.custom_op("nano::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for decode through ``nano_decode_attention_f32``: q (b, heads, R, d), the R
    query heads that read each KV head; k, v (b, heads, L, d) (views of a longer cache are read in place).
    ``F.scaled_dot_product_attention(q, k, v)`` without a mask, read in one pass over the cache."""
    return _decode_attention(q, k, v, None)


@torch.library.custom_op("nano::decode_attention_padded", mutates_args=())
def decode_attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """``decode_attention`` for a left-padded batch: row b's first ``pad[b]`` keys are padding it does not see
    (``pad`` (b,) int64, the cache's ``pad_len``); its last key, the new token's own, it always sees. SDPA with
    ``layers.padded_causal_mask(pad, L - 1, 1)``, read in one pass over the real keys."""
    if not _pad_usable(pad, q.shape[0]):
        raise ValueError(f"decode_attention_padded takes pad as a contiguous (batch,) int64 CPU tensor, got "
                         f"{tuple(pad.shape)} {pad.dtype}")
    return _decode_attention(q, k, v, pad)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    lib = library()
    if lib is None:
        raise RuntimeError(f"nano's CPU kernel library is not available: {reason()}")
    b, h, r, d = q.shape
    if (not all(t.dtype == torch.float32 and t.dim() == 4 and t.stride(-1) == 1 for t in (q, k, v))
            or k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[-1] != d or k.shape[2] < 1
            or d > DECODE_ATTENTION_MAX_D):
        raise ValueError(f"decode_attention takes float32 q (b, heads, R, d <= {DECODE_ATTENTION_MAX_D}) and k, v "
                         f"(b, heads, L, d) with unit stride along d, got {tuple(q.shape)} {q.dtype}, "
                         f"{tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    q = q.contiguous()
    out = torch.empty_like(q)
    ks, vs = k.stride(), v.stride()
    if lib.nano_decode_attention_f32(q.data_ptr(), k.data_ptr(), ks[0], ks[1], ks[2], v.data_ptr(), vs[0], vs[1],
                                     vs[2], b, h, r, k.shape[2], d, d ** -0.5, out.data_ptr(),
                                     None if pad is None else pad.data_ptr()):
        raise ValueError(f"decode_attention refused q {tuple(q.shape)}, k {tuple(k.shape)}")
    return out


@decode_attention.register_fake
def _decode_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@decode_attention_padded.register_fake
def _decode_attention_padded_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def ssm_usable(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               C: torch.Tensor, D: torch.Tensor | None) -> bool:
    """Whether ``ssm_step`` can take this call: CPU float32 throughout, a contiguous state (b, H, P, N), x (b, H, P),
    dt (b, H), A and D (H,), B and C (b, G, N) with ``ssm_step``'s strides, the library loaded."""
    if D is None or not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (state, x, dt, A, B, C, D)):
        return False
    if state.dim() != 4 or not state.is_contiguous() or x.dim() != 3 or dt.dim() != 2 or B.dim() != 3:
        return False
    b, H, P, N = state.shape
    G = B.shape[1]
    return (x.shape == (b, H, P) and _inner(x) and dt.shape == (b, H) and (H == 1 or dt.stride(1) == 1)
            and A.shape == (H,) and D.shape == (H,) and (H == 1 or (A.stride(0) == 1 and D.stride(0) == 1))
            and G >= 1 and H % G == 0 and all(t.shape == (b, G, N) and _inner(t) for t in (B, C)) and available())


def _inner(t: torch.Tensor) -> bool:
    """A 3-D t laid out as rows of its last two dimensions: unit stride last, row stride the row length."""
    return t.stride(2) == 1 and (t.shape[1] == 1 or t.stride(1) == t.shape[2])


@torch.library.custom_op("nano::ssm_step", mutates_args=("state",))
def ssm_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """One token of the Mamba-2 recurrence through ``nano_ssm_step_f32``; ``state`` updated in place, y (b, H, P)
    float32 returned. Shapes and layouts: ``ssm_usable``."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"nano's CPU kernel library is not available: {reason()}")
    if not ssm_usable(state, x, dt, A, B, C, D):
        raise ValueError(f"ssm_step takes a contiguous float32 state (b, H, P, N), x (b, H, P), dt (b, H), A and D "
                         f"(H,), B and C (b, G, N), got state {tuple(state.shape)} {state.dtype}, x {tuple(x.shape)}, "
                         f"dt {tuple(dt.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}")
    b, H, P, N = state.shape
    y = torch.empty(b, H, P)
    if lib.nano_ssm_step_f32(state.data_ptr(), x.data_ptr(), x.stride(0), dt.data_ptr(), dt.stride(0), A.data_ptr(),
                             B.data_ptr(), B.stride(0), C.data_ptr(), C.stride(0), D.data_ptr(), b, H, B.shape[1],
                             P, N, y.data_ptr()) != 0:
        raise ValueError(f"ssm_step refused state {tuple(state.shape)}, B {tuple(B.shape)}")
    return y


@ssm_step.register_fake
def _ssm_step_fake(state, x, dt, A, B, C, D) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)  # contiguous


def _shim(name: str, *inputs: str) -> list[str]:
    """The C declaration of the library's shim ``aoti_torch_cpu_<name>``: tensor ``inputs``, one tensor out."""
    return [f"AOTITorchError aoti_torch_cpu_{name}(" + "".join(f"AtenTensorHandle {a}, " for a in inputs)
            + "AtenTensorHandle* ret0)"]


def aot_options() -> dict:
    """Inductor options that make an ahead-of-time library call each op's C shim directly."""
    ops = torch.ops.nano
    return {"aot_inductor.custom_ops_to_c_shims": {
        ops.row_gemv_f32.default: _shim("row_gemv_f32", "x", "weight"),
        ops.row_gemv_q8.default: _shim("row_gemv_q8", "x", "q", "scale"),
        ops.decode_attention.default: _shim("decode_attention", "q", "k", "v"),
        ops.decode_attention_padded.default: _shim("decode_attention_padded", "q", "k", "v", "pad"),
        ops.ssm_step.default: _shim("ssm_step", "state", "x", "dt", "A", "B", "C", "D"),
    }}
