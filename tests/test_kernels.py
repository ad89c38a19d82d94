"""kernels.py: the one switch between the CUDA kernels and the reference.

On CPU (this machine, CI) the reference always runs. The ``gpu`` tests compare mamba-ssm /
causal-conv1d against the reference and run only where CUDA and those packages exist.
"""

import pytest
import torch

from model_utils import randomize, rel_err, tiny_config
from nanocli_model import NanoForCausalLM, kernels
from nanocli_model import reference as R


def test_cpu_tensors_use_the_reference():
    assert kernels.backend_for(torch.zeros(1)) == "reference"


def test_switch_forces_reference_and_validates(monkeypatch):
    with kernels.use("reference"):
        assert kernels._forced == "reference"
        with kernels.use("auto"):
            assert kernels._forced == "auto"
        assert kernels._forced == "reference"
    assert kernels._forced is None
    with pytest.raises(ValueError, match="reference"):
        with kernels.use("triton"):
            pass
    monkeypatch.setenv("NANO_KERNELS", "reference")
    assert kernels.backend_for(torch.zeros(1)) == "reference"


def test_importing_the_library_needs_no_cuda_packages():
    import subprocess
    import sys

    code = ("import sys, nanocli_model, nanocli_model.model, nanocli_model.kernels;"
            "print(any(m.startswith(('mamba_ssm', 'causal_conv1d')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("state", [16, 128])
def test_cpu_block_choice_does_not_change_results(state):
    # kernels.ssd_scan picks its own block length on CPU; the decomposition is exact for any length.
    g = torch.Generator().manual_seed(state)
    x = torch.randn(1, 150, 4, 8, generator=g, dtype=torch.float64)
    dt_raw = torch.randn(1, 150, 4, generator=g, dtype=torch.float64)
    B, C = (torch.randn(1, 150, 2, state, generator=g, dtype=torch.float64) for _ in range(2))
    A, D, dt_bias = -torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), torch.zeros(4)
    y, s = kernels.ssd_scan(x, dt_raw, dt_bias, A, B, C, D, 128, (0.0, float("inf")))
    dt = R.discretize_dt(dt_raw, dt_bias, (0.0, float("inf")))
    y_ref, s_ref = R.ssd_sequential(x, dt, A, B, C, D)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)


def test_scan_leaves_its_inputs_alone():
    g = torch.Generator().manual_seed(0)
    x, h0 = torch.randn(1, 40, 4, 8, generator=g), torch.randn(1, 4, 8, 6, generator=g)
    B, C = torch.randn(1, 40, 2, 6, generator=g), torch.randn(1, 40, 2, 6, generator=g)
    dt, A = torch.rand(1, 40, 4, generator=g), -torch.rand(4, generator=g)
    before = [t.clone() for t in (x, h0, B, C, dt, A)]
    with torch.inference_mode():
        R.ssd_chunked(x, dt, A, B, C, 16, None, h0)
    assert all(torch.equal(a, b) for a, b in zip(before, (x, h0, B, C, dt, A)))


gpu = pytest.mark.skipif(not torch.cuda.is_available() or kernels._cuda_ops() is None,
                         reason="needs CUDA and mamba-ssm / causal-conv1d")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 37, 256, 1000])
def test_kernel_scan_matches_reference(T):
    g = torch.Generator(device="cuda").manual_seed(T)
    kw = dict(device="cuda", generator=g)
    x = torch.randn(2, T, 8, 16, **kw)
    dt_raw, B, C = torch.randn(2, T, 8, **kw), torch.randn(2, T, 2, 32, **kw), torch.randn(2, T, 2, 32, **kw)
    A, D, dt_bias, h0 = -torch.rand(8, **kw), torch.randn(8, **kw), torch.randn(8, **kw), torch.randn(2, 8, 16, 32, **kw)
    limit = (0.0, float("inf"))
    y_k, s_k = kernels.ssd_scan(x, dt_raw, dt_bias, A, B, C, D, 64, limit, initial_state=h0)
    with kernels.use("reference"):
        y_r, s_r = kernels.ssd_scan(x, dt_raw, dt_bias, A, B, C, D, 64, limit, initial_state=h0)
    assert rel_err(y_k, y_r) < 1e-3 and rel_err(s_k, s_r) < 1e-3


@pytest.mark.gpu
@gpu
def test_kernel_model_matches_reference_prefill_and_decode():
    m = NanoForCausalLM(tiny_config(chunk_size=16)).cuda().eval()
    randomize(m, 0)
    ids = torch.randint(0, 96, (2, 50), device="cuda")
    with torch.no_grad():
        with kernels.use("reference"):
            ref = m(ids)
        full = m(ids)
        cache = m.allocate_cache(2, 64)
        steps = torch.cat([m(ids[:, :40], cache)] + [m(ids[:, t:t + 1], cache) for t in range(40, 50)], 1)
    assert rel_err(full, ref) < 1e-3 and rel_err(steps, ref) < 1e-3
