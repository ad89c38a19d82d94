"""nano's kernel dispatch into mamba-ssm's real Triton kernels, run on the CPU by Triton's interpreter.

``kernels.ssd_scan`` / ``ssd_step`` call ``mamba_chunk_scan_combined`` / ``selective_state_update`` exactly as
on a GPU; ``TRITON_INTERPRET=1`` executes those kernels with NumPy. Every result is compared with the
reference: a float64 step-by-step recurrence, or the model under ``kernels.use("reference")``. So a dropped
``dt_bias``, a swapped argument or a lost initial state fails here, on any CPU, in CI.

What the fixture (not nano) arranges for the interpreter: the environment variable before mamba-ssm's modules
are imported (``@triton.jit`` reads it at decoration), one autotune configuration per kernel (the autotuner
would time several on a GPU), and CPU tensors admitted to the kernel path. The interpreter computes bf16
``tl.dot`` wrongly, so scans run in float32 (the decode step has no ``tl.dot`` and also runs in bf16).
causal-conv1d is a CUDA extension: the conv here is the reference (``test_kernels.py`` holds nano's calls
into it to the extension's contract).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys

import pytest
import torch

from model_utils import randomize, rel_err, tiny_config
from nanocli_model import NanoForCausalLM, kernels
from nanocli_model import reference as R

INF = (0.0, math.inf)


def _drop_mamba_modules() -> None:
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[name]
    kernels._reset_imports()


@pytest.fixture(scope="module")
def triton_cpu():
    """mamba-ssm's Triton kernels, interpreted on the CPU, behind nano's dispatch; counts the calls into them."""
    if torch.cuda.is_available():  # conftest.py leaves Triton compiling for the GPU there: the gpu tests run it
        pytest.skip("a CUDA GPU is present: the real kernels run in the gpu-marked tests (make gpu-check)")
    missing = [m for m in ("triton", "einops", "mamba_ssm") if importlib.util.find_spec(m) is None]
    assert not missing, (f"{', '.join(missing)} not installed: `make install` installs triton, einops and the "
                         "mamba-ssm sdist (MAMBA_SKIP_CUDA_BUILD=TRUE) for these tests")
    import triton.language.standard
    from triton.runtime import autotuner
    from triton.runtime.interpreter import InterpretedFunction

    # conftest.py sets TRITON_INTERPRET before anything imports triton (its library is decorated at import)
    assert isinstance(triton.language.standard.cumsum, InterpretedFunction), \
        "triton was imported before TRITON_INTERPRET=1 was set (conftest.py sets it on machines without CUDA)"
    mp = pytest.MonkeyPatch()
    mp.setattr(autotuner.Autotuner, "prune_configs", lambda self, kwargs: self.configs[:1])
    mp.setattr(torch.cuda, "device", lambda *a, **k: contextlib.nullcontext())
    mp.setattr(kernels, "_on_kernel_device", lambda t: True)
    _drop_mamba_modules()  # imported again below, decorated for the interpreter
    ops, info = kernels._ssd_ops()
    assert ops is not None, info
    calls = {"scan": [], "step": []}
    for name in calls:
        real = ops[name]

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name].append(args[0].shape)  # x for the scan, the state for the step
            return _real(*args, **kwargs)

        mp.setitem(ops, name, spy)
    yield calls
    mp.undo()
    _drop_mamba_modules()  # nothing interpreted stays behind for later tests


@pytest.fixture
def calls(triton_cpu):
    for seen in triton_cpu.values():
        seen.clear()
    return triton_cpu


def scan_case(b=2, T=37, H=4, P=8, G=2, N=16, seed=0, dt_view=True):
    """Random scan operands; dt_raw (and x, B, C) as split views of one fused tensor, as in_proj / conv give."""
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(b, T, H * P + 2 * G * N + H + 5, generator=g)
    x, B, C, dt_raw, _ = fused.split([H * P, G * N, G * N, H, 5], dim=-1)
    x, B, C = x.reshape(b, T, H, P), B.reshape(b, T, G, N), C.reshape(b, T, G, N)
    if not dt_view:
        dt_raw = dt_raw.contiguous()
    A = -(torch.rand(H, generator=g) + 0.2)
    D = torch.randn(H, generator=g)
    dt_bias = torch.rand(H, generator=g) - 0.5
    h0 = torch.randn(b, H, P, N, generator=g)
    return x, dt_raw, dt_bias, A, B, C, D, h0


def sequential(x, dt_raw, dt_bias, A, B, C, D, h0, limit=INF):
    """The float64 recurrence, one token at a time: the definition."""
    dt = R.discretize_dt(dt_raw.double(), dt_bias.double(), limit)
    return R.ssd_sequential(x.double(), dt, A.double(), B.double(), C.double(), D.double(),
                            None if h0 is None else h0.double())


def test_status_names_the_triton_kernels(triton_cpu):
    s = kernels.status("cpu")
    assert s.ssd.startswith("mamba-ssm") and "Triton" in s.ssd
    assert kernels.backend_for(torch.zeros(1)) == "cuda"  # the fixture admits CPU tensors
    assert "scan/step mamba-ssm" in s.describe()
    with kernels.use("reference"):
        assert kernels.status("cpu").label == "reference"


@pytest.mark.parametrize("T, chunk, limit", [(37, 16, INF), (64, 16, INF), (5, 16, (0.3, 0.9)), (37, 8, (0.05, 2.0))])
def test_scan_matches_the_recurrence(calls, T, chunk, limit):
    # T not a multiple of the chunk, T shorter than one chunk, n_groups 2 (two heads a group), a time_step_limit
    # that clamps both ends, an initial state, dt as a strided view of a fused projection
    x, dt_raw, dt_bias, A, B, C, D, h0 = scan_case(T=T, seed=T)
    y, s = kernels.ssd_scan(x, dt_raw, dt_bias, A, B, C, D, chunk, limit, initial_state=h0)
    y_ref, s_ref = sequential(x, dt_raw, dt_bias, A, B, C, D, h0, limit)
    assert len(calls["scan"]) == 1
    assert y.dtype == s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-4 and rel_err(s, s_ref) < 1e-4


def test_chunked_prefill_carries_the_state(calls):
    x, dt_raw, dt_bias, A, B, C, D, h0 = scan_case(T=50, seed=3)
    ys, state = [], h0
    for t in (slice(0, 13), slice(13, 40), slice(40, 50)):
        y, state = kernels.ssd_scan(x[:, t], dt_raw[:, t], dt_bias, A, B[:, t], C[:, t], D, 16, INF,
                                    initial_state=state)
        ys.append(y)
    y_ref, s_ref = sequential(x, dt_raw, dt_bias, A, B, C, D, h0)
    assert len(calls["scan"]) == 3
    assert rel_err(torch.cat(ys, 1), y_ref) < 1e-4 and rel_err(state, s_ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("limit", [INF, (0.2, 0.6)])
def test_decode_steps_match_the_recurrence(calls, dtype, limit):
    # selective_state_update with nano's arguments (dt discretized in float32, a zero dt_bias, no softplus):
    # the call that crashed on every CUDA decode step when dt_bias was None.
    x, dt_raw, dt_bias, A, B, C, D, h0 = scan_case(T=4, H=8, P=8, G=2, N=16, seed=7)
    x, dt_raw, B, C, Dm = (t.to(dtype) for t in (x, dt_raw, B, C, D))
    state = h0.clone()  # float32, the cache's SSM dtype
    ys = [kernels.ssd_step(state, x[:, t], dt_raw[:, t], dt_bias.to(dtype), A, B[:, t], C[:, t], Dm, limit)
          for t in range(4)]
    y_ref, s_ref = sequential(x.float(), dt_raw.float(), dt_bias.to(dtype).float(), A, B.float(), C.float(),
                              Dm.float(), h0, limit)
    assert len(calls["step"]) == 4
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: x, dt_raw, B, C rounded alike, y returned in bf16
    assert rel_err(torch.stack(ys, 1), y_ref) < tol and rel_err(state, s_ref) < tol


def test_int32_guard_splits_the_batch_and_the_time(calls, monkeypatch):
    # With a small limit standing in for 2**31, the scan runs in several calls (batch rows apart, then time
    # pieces with the state carried over) and still equals the recurrence; each call stays under the limit.
    x, dt_raw, dt_bias, A, B, C, D, h0 = scan_case(b=3, T=40, H=4, P=8, G=2, N=16, seed=11)
    row = kernels.scan_row_elements(40, 4, 8, 2, 16, 16)
    monkeypatch.setattr(kernels, "INT32_LIMIT", 2 * row)  # two rows a call: batch pieces [0:1], [1:2], [2:3]
    y, s = kernels.ssd_scan(x, dt_raw, dt_bias, A, B, C, D, 16, INF, initial_state=h0)
    assert [shape[0] for shape in calls["scan"]] == [1, 1, 1]
    y_ref, s_ref = sequential(x, dt_raw, dt_bias, A, B, C, D, h0)
    assert rel_err(y, y_ref) < 1e-4 and rel_err(s, s_ref) < 1e-4

    calls["scan"].clear()
    monkeypatch.setattr(kernels, "INT32_LIMIT", 20 * 4 * 8)  # one row of 40 tokens is too large: 16-token pieces
    y, s = kernels.ssd_scan(x, dt_raw, dt_bias, A, B, C, D, 16, INF, initial_state=h0)
    assert sorted({shape[1] for shape in calls["scan"]}) == [8, 16] and len(calls["scan"]) == 9
    assert rel_err(y, y_ref) < 1e-4 and rel_err(s, s_ref) < 1e-4


@pytest.fixture(scope="module")
def tiny_model():
    m = NanoForCausalLM(tiny_config(chunk_size=16)).eval()
    randomize(m, 0)
    return m


def test_model_forward_prefill_and_decode_match_the_reference(calls, tiny_model):
    m = tiny_model
    ids = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with kernels.use("reference"):
            ref = m(ids)
        full = m(ids)
        cache = m.allocate_cache(2, 32)
        steps = torch.cat([m(ids[:, :20], cache), m(ids[:, 20:27], cache)]
                          + [m(ids[:, t:t + 1], cache) for t in range(27, 30)], 1)
    assert calls["scan"] and calls["step"]  # both kernels ran (3 Mamba layers each call)
    assert rel_err(full, ref) < 1e-4
    assert rel_err(steps, ref) < 1e-4  # prefill, a second chunk from the cached state, then decode steps


def test_left_padded_rows_equal_their_prompts_alone(calls, tiny_model):
    m = tiny_model
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 96, (n,), generator=g) for n in (9, 21, 14)]
    follow = torch.randint(1, 96, (3, 3), generator=g)
    T = max(len(p) for p in prompts)
    ids, mask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    with torch.inference_mode():
        cache = m.allocate_cache(3, T + 3)
        batched = torch.cat([m(ids, cache, logits_to_keep=1, attention_mask=mask)]
                            + [m(follow[:, j:j + 1], cache) for j in range(3)], 1)
        for i, p in enumerate(prompts):
            with kernels.use("reference"):
                c1 = m.allocate_cache(1, len(p) + 3)
                alone = torch.cat([m(p[None], c1, logits_to_keep=1)]
                                  + [m(follow[i:i + 1, j:j + 1], c1) for j in range(3)], 1)
            assert rel_err(batched[i:i + 1], alone) < 1e-4, f"row {i}"
    assert calls["scan"] and calls["step"]


def test_padded_generation_in_chunks_matches_the_reference(calls, tiny_model):
    # A short prompt beside a long one: the padding is longer than the prefill chunk, yet no forward exceeds
    # the chunk (fit-check's assumption) and the kernels' tokens equal the reference's.
    from nanocli_model.generation import SamplingParams, generate

    m, seen = tiny_model, []
    hook = m.backbone.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    prompts = [[5, 9, 13], list(range(20, 37))]
    params = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    try:
        got = [c.token_ids for c in generate(m, prompts, params, prefill_chunk=4).completions]
    finally:
        hook.remove()
    with kernels.use("reference"):
        want = [c.token_ids for c in generate(m, prompts, params, prefill_chunk=4).completions]
    assert got == want and calls["scan"] and calls["step"]
    assert max(seen) == 4 and seen[:5] == [4, 4, 4, 4, 1]  # 17 prompt tokens in chunks of 4, then decode
