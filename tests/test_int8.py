"""int8 projections (``nanocli_model.quant``, ``--dtype int8``): held to the fp32 model and to float64
emulations of the kernels' arithmetic, not to itself."""

import json

import pytest
import torch
from torch import nn

from model_utils import needs_cxx, randomize, tiny_config
from nanocli_model import NanoForCausalLM, fit, load_pretrained, row_gemv, save_pretrained
from nanocli_model.errors import CheckpointError, ConfigError
from nanocli_model.quant import (
    GEMV_ROWS,
    QUANT_METHOD,
    SMOOTH_ALPHA,
    Int8Linear,
    calibration_ids,
    input_maxima,
    parameter_count,
    quantize_int8,
    quantize_rows,
    quantized_names,
    smoothing_divisors,
)

# Per-channel symmetric int8 rounds each weight by at most scale/2 = max|row|/254. Decode rows (up to
# GEMV_ROWS) run nano's int8 GEMV (row_gemv.py: the input rounded to 16 bits, weight-only to within 1e-4), or,
# without it, fbgemm's dynamic int8 GEMM, which also quantizes the input: one asymmetric 7-bit scale per call
# (reduce_range, so AVX2's 16-bit pair sums cannot saturate). Against fp32, for Gaussian rows and inputs, the
# output's relative (Frobenius) error measures ~0.5-0.8% weight-only (prefill) and ~1.5-2% with the input
# quantized too (decode). The bound leaves room for that, not for a wrong scale or layout (those are 10-100%).
LAYER_BOUND = 3e-2
# Whole-model logits vs fp32 on TINY models (hidden 32: each 32-wide input gets its own 7-bit scale, and the
# random model compounds the error layer by layer): measured 1.9-2.7% prefill, 2.8-7.3% decode over 4 seeds.
LOGITS_BOUND = 8e-2


def frob(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def w8a8_reference(x: torch.Tensor, q: Int8Linear, bias: torch.Tensor | None) -> torch.Tensor:
    """fbgemm's dynamic int8 linear computed in float64 from its definition: the input quantized to uint8 in
    [0, 127] with one scale and zero point over the whole call (the range includes 0), the int8 weight with its
    per-row scale, products summed exactly."""
    xd = x.double().reshape(-1, x.shape[-1])
    if q.smooth is not None:
        xd = xd / q.smooth.double()
    lo, hi = min(xd.min().item(), 0.0), max(xd.max().item(), 0.0)
    s = (hi - lo) / 127
    zp = min(max(round(-lo / s), 0), 127)
    xq = (torch.round(xd / s) + zp).clamp(0, 127)
    y = ((xq - zp) * s) @ (q.int8_weight().double() * q.weight_scale.double()[:, None]).t()
    y = y if bias is None else y + bias.double()
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("rows", [1, GEMV_ROWS, 3 * GEMV_ROWS])  # int8 GEMV (decode) and dequantize + GEMM
@pytest.mark.parametrize("shape,bias", [((64, 256), False), ((384, 96), True)])
@pytest.mark.parametrize("kernel", ["nano", "fbgemm"])
def test_each_quantized_linear_is_within_its_bound_of_fp32(rows, shape, bias, kernel):
    g = torch.Generator().manual_seed(0)
    out_f, in_f = shape
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    if kernel == "nano" and not row_gemv.available():
        pytest.skip(f"no CPU GEMV library: {row_gemv.reason()}")
    with row_gemv.use(kernel == "nano"):  # the kernel is chosen when the module is built
        q = Int8Linear.from_linear(lin)
    x = torch.randn(1 if rows <= GEMV_ROWS else 2, rows, in_f, generator=g)
    ref = torch.nn.functional.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    with torch.no_grad():
        y = q(x)
    assert frob(y, ref) < LAYER_BOUND, frob(y, ref)
    dequantized = torch.nn.functional.linear(x.double(), q.dequantized().double(),
                                             None if lin.bias is None else lin.bias.double())
    if rows <= GEMV_ROWS and kernel == "nano":  # weight-only int8: the input's 16-bit rounding stays below 1e-4
        assert q._packed is None and frob(y, dequantized) < 1e-4
    elif rows <= GEMV_ROWS:  # exactly fbgemm's W8A8 arithmetic (float32 accumulation of the scales: ~1e-7)
        assert q._packed is not None and frob(y, w8a8_reference(x, q, lin.bias)) < 1e-5
    else:  # the stored int8 weight, dequantized, in one float GEMM
        assert frob(y, dequantized) < 1e-6
    w = q.int8_weight()
    assert w.dtype == q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    assert (w.abs() <= 127).all() and (w.abs().amax(1) == 127).all()  # symmetric, full range


def test_the_int8_values_are_held_once_in_fbgemm_packed_form_and_round_trip():
    """After packing, ``weight`` is a meta tensor (shape and dtype, no values to go stale), the packed matrix
    holds the values, and state_dict / load_state_dict (copy or assign) carry them both ways."""
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(48, 40, bias=True)
    with row_gemv.use(False):  # fbgemm holds the values (nano's GEMV reads a plain buffer: next test)
        _packed_round_trip(lin, g)


def _packed_round_trip(lin, g):
    q = Int8Linear.from_linear(lin)
    other = Int8Linear(48, 40, bias=True)
    assert q.weight.device.type == "meta" and q.weight.shape == (40, 48) and q.weight.dtype == torch.int8
    sd = q.state_dict()
    assert sd["weight"].device.type == "cpu" and torch.equal(sd["weight"], quantize_rows(lin.weight)[0])
    other.load_state_dict(sd)  # copy into an existing (packed) module
    x = torch.randn(1, 48, generator=g)
    with torch.no_grad():
        assert torch.equal(other(x), q(x))
        sd2 = {k: v.clone() for k, v in sd.items()}
        sd2["weight_scale"] *= 2  # a new scale alone repacks with it
        other.load_state_dict(sd2)
        torch.testing.assert_close(other(x) - other.bias, 2 * (q(x) - q.bias), rtol=1e-5, atol=1e-5)


def test_with_nanos_gemv_the_values_stay_one_plain_buffer_and_round_trip():
    """With nano's int8 GEMV the values stay a row-major int8 buffer (what the kernel and a compiled step read);
    state_dict / load_state_dict carry them, and a new scale is used at once."""
    if not row_gemv.available():
        pytest.skip(f"no CPU GEMV library: {row_gemv.reason()}")
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(48, 40, bias=True)
    q = Int8Linear.from_linear(lin)
    assert q._packed is None and q.weight.device.type == "cpu" and q.weight.stride() == (48, 1)
    assert torch.equal(q.weight, quantize_rows(lin.weight)[0])
    other = Int8Linear(48, 40, bias=True)
    other.load_state_dict(q.state_dict())
    x = torch.randn(1, 48, generator=g)
    with torch.no_grad():
        assert torch.equal(other(x), q(x))
        sd = {k: v.clone() for k, v in q.state_dict().items()}
        sd["weight_scale"] *= 2
        other.load_state_dict(sd)
        torch.testing.assert_close(other(x) - other.bias, 2 * (q(x) - q.bias), rtol=1e-5, atol=1e-5)


def test_without_fbgemm_decode_rows_take_the_weight_only_kernel(monkeypatch):
    """A torch without fbgemm's dynamic linear (its quantized API is deprecated upstream) still runs int8:
    ``torch._weight_int8pack_mm`` on a bf16 input (weight-only: the input keeps 8 mantissa bits)."""
    from nanocli_model import quant

    monkeypatch.setattr(quant, "fbgemm_available", lambda: False)
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(96, 64, bias=False)
    with row_gemv.use(False):
        q = Int8Linear.from_linear(lin)
    assert q._packed is None and q.weight.device.type == "cpu"
    x = torch.randn(1, 96, generator=g)
    with torch.no_grad(), row_gemv.use(False):
        want = torch.nn.functional.linear(x.bfloat16().double(), q.dequantized().double())
        assert frob(q(x), want) < 1e-2  # bf16 output rounding
        assert frob(q(x), torch.nn.functional.linear(x.double(), lin.weight.double())) < LAYER_BOUND


def test_smoothing_factors_follow_smoothquant_from_the_calibration_inputs():
    """max|x_j|^a / max|W_:,j|^(1-a), with x the inputs the Linear saw (a channel below a tenth of the median
    range taken at that tenth), computed here in float64 from the calibration rows themselves."""
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(16, 8, bias=False)
    rows = torch.randn(3, 5, 16, generator=g)
    rows[..., 2] *= 40  # an outlier channel
    rows[..., 7] = 0.0  # a channel never driven
    model = nn.Sequential(lin)
    with torch.no_grad(), input_maxima(model, ["0"]) as amax:
        for r in rows:
            model(r)
    s = smoothing_divisors(amax["0"], lin.weight, 0.65).double()
    a = rows.double().abs().reshape(-1, 16).amax(0)
    a = torch.maximum(a, 0.1 * a.median())
    want = a**0.65 / lin.weight.double().abs().amax(0) ** 0.35
    torch.testing.assert_close(s, want, rtol=1e-5, atol=0)
    assert s[2] > 5 * s.median() and s[7] > 0


def test_smoothing_cuts_the_decode_error_of_inputs_with_outlier_channels():
    """The case it exists for: a few input channels 30x the rest make fbgemm's per-call activation scale coarse
    for all others. Smoothed on such inputs, the decode (W8A8) error against fp32 drops well below the
    unsmoothed one, and the smoothed layer still computes exactly W8A8 of x / smooth against W * smooth. (nano's
    own int8 GEMV rounds the input to 16 bits: there smoothing neither helps nor hurts.)"""
    with row_gemv.use(False):
        _smoothing_case()


def _smoothing_case():
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(256, 128, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(128, 256, generator=g) / 16)

    def inputs(n):
        x = torch.randn(n, 256, generator=g)
        x[:, :4] *= 30
        return x

    x = inputs(64)
    smooth = smoothing_divisors(x.abs().amax(0), lin.weight, SMOOTH_ALPHA)
    plain, smoothed = Int8Linear.from_linear(lin), Int8Linear.from_linear(lin, smooth)
    x = inputs(8)[:, None]  # 8 decode calls of one row each
    ref = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    with torch.no_grad():
        e_plain, e_smooth = frob(plain(x), ref), frob(smoothed(x), ref)
        assert e_smooth < 0.5 * e_plain, (e_smooth, e_plain)
        for row in x:
            assert frob(smoothed(row), w8a8_reference(row, smoothed, lin.bias)) < 1e-5
        wide = torch.randn(2, 3 * GEMV_ROWS, 256, generator=g)  # prefill: x / smooth against the dequantized W * s
        want = torch.nn.functional.linear(wide.double() / smooth.double(), smoothed.dequantized().double(),
                                          lin.bias.double())
        assert frob(smoothed(wide), want) < 1e-6


def _saved(tmp_path, seed=0, **overrides):
    m = NanoForCausalLM(tiny_config(**overrides))
    randomize(m, seed)
    return save_pretrained(m, tmp_path / "fp32")


@pytest.mark.parametrize("tied", [False, True])
def test_layer_by_layer_load_equals_quantizing_the_whole_float_model(tmp_path, monkeypatch, tied):
    """``load_pretrained(dtype="int8")`` reads each layer's projections only when its calibration pass reaches
    it. Its int8 weights, scales and divisors must equal those of the simplest form: the whole fp32 model
    loaded, every projection's input maxima recorded over whole-model forwards of the calibration rows, then
    each Linear quantized with those divisors. And the weights are read once each, in layer order, lm_head
    last: the order the calibration pass reaches them."""
    path = _saved(tmp_path, seed=6, tie_word_embeddings=tied)
    ref = load_pretrained(path, dtype="fp32")
    names = quantized_names(ref)
    with torch.no_grad(), input_maxima(ref, names) as amax:
        for row in calibration_ids(ref.config.vocab_size):
            ref(row[None])
    want = {n: Int8Linear.from_linear(ref.get_submodule(n),
                                      smoothing_divisors(amax[n], ref.get_submodule(n).weight, SMOOTH_ALPHA))
            for n in names}

    from nanocli_model import checkpoint

    reads, real_read = [], checkpoint._read_float

    def spy(where):  # the reads are in layer order, and a layer's weights are read while the rest is not int8
        reads.append(where[0])
        return real_read(where)
    monkeypatch.setattr(checkpoint, "_read_float", spy)
    q = load_pretrained(path, dtype="int8")
    assert reads == [f"{n}.weight" for n in names]  # each once, lower layers first, lm_head last
    assert ("lm_head" in names) is not tied
    for n in names:
        got, exp = q.get_submodule(n), want[n]
        assert torch.equal(got.int8_weight(), exp.int8_weight()), n
        assert torch.equal(got.weight_scale, exp.weight_scale) and torch.equal(got.smooth, exp.smooth), n


def test_whole_model_logits_close_to_fp32_prefill_and_decode(tmp_path):
    path = _saved(tmp_path)
    ref, q = load_pretrained(path, dtype="fp32"), load_pretrained(path, dtype="int8")
    assert q.dtype == torch.float32 and isinstance(q.lm_head, Int8Linear)
    assert q.backbone.embeddings.weight.dtype == torch.float32 and q.backbone.layers[0].mixer.A_log.dtype == torch.float32
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert frob(q(ids), ref(ids)) < LOGITS_BOUND
        cq, cr = q.allocate_cache(2, 40), ref.allocate_cache(2, 40)
        q(ids, cq), ref(ids, cr)
        for t in range(5):  # decode steps: the int8 kernel path
            tok = ids[:, t:t + 1]
            assert frob(q(tok, cq), ref(tok, cr)) < LOGITS_BOUND


def test_greedy_agreement_with_fp32_on_a_random_model(tmp_path):
    """No trained model can be made quickly here: a random (``randomize``d) TINY model, so a looser check than
    the >= 95% of free-running greedy tokens the issue asks of a trained model (BENCHMARKS.md says what was
    measured). A random model's greedy run is chaotic (one near-tie flips every later input), so this checks
    each decode step's argmax with the inputs forced to fp32's greedy tokens."""
    path = _saved(tmp_path, seed=3)
    ref, q = load_pretrained(path, dtype="fp32"), load_pretrained(path, dtype="int8")
    prompt = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(2))
    cr, cq, agree, n = ref.allocate_cache(1, 80), q.allocate_cache(1, 80), 0, 64
    with torch.no_grad():
        tok, tq = ref(prompt, cr)[:, -1].argmax(-1), q(prompt, cq)[:, -1].argmax(-1)
        for _ in range(n):
            agree += int(tok) == int(tq)
            tq = q(tok[:, None], cq)[:, -1].argmax(-1)  # fed fp32's token
            tok = ref(tok[:, None], cr)[:, -1].argmax(-1)
    assert agree / n >= 0.9, agree


def test_save_and_reload_is_bit_identical_without_requantizing(tmp_path):
    path = _saved(tmp_path)
    q = load_pretrained(path, dtype="int8")
    out = save_pretrained(q, tmp_path / "int8")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == QUANT_METHOD and "lm_head" in qc["modules"]
    assert qc["smoothing"]["alpha"] == SMOOTH_ALPHA
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "I8"
        assert f.get_slice("lm_head.weight_scale").get_dtype() == "F32"
        assert f.get_slice("lm_head.smooth").get_dtype() == "F32"
        assert not torch.all(f.get_tensor("backbone.layers.0.mixer.in_proj.smooth") == 1)
        assert f.get_slice("backbone.embeddings.weight").get_dtype() == "F32"
    back = load_pretrained(out)  # no dtype: as saved
    for k, v in q.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids), q(ids))
        c1, c2 = back.allocate_cache(1, 20), q.allocate_cache(1, 20)
        back(ids, c1), q(ids, c2)
        assert torch.equal(back(ids[:, :1], c1), q(ids[:, :1], c2))


def test_fit_weights_term_is_exact_in_bytes(tmp_path):
    for tied in (False, True):
        c = tiny_config(tie_word_embeddings=tied, attention_bias=True, mlp_bias=True)
        m = quantize_int8(NanoForCausalLM(c))
        assert parameter_count(m) == fit.param_count(c).total  # the int8 weights are buffers, counted as weights
        seen, stored = set(), 0
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                stored += t.numel() * t.element_size()
        assert fit.weights_bytes(c, "int8") == stored
        assert fit.compute_dtype("int8") == "fp32"


def test_int8_off_the_cpu_and_foreign_quantization_are_one_line_errors(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="CPU only") as e:
        load_pretrained(path, dtype="int8", device="cuda")
    assert "\n" not in str(e.value)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="gptq"):
        load_pretrained(path)


@needs_cxx
def test_compiled_decode_runs_the_int8_model(tmp_path):
    from nanocli_model.decode import CompiledDecode

    path = _saved(tmp_path)
    q = load_pretrained(path, dtype="int8")
    eager = load_pretrained(path, dtype="int8")
    step = CompiledDecode(q)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c1, c2 = q.allocate_cache(1, 20), eager.allocate_cache(1, 20)
        q(ids, c1), eager(ids, c2)
        for t in range(3):
            tok = ids[:, t:t + 1]
            got, want = step(tok, c1), eager(tok, c2)
            assert step.fallback_reason is None
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_generate_saves_the_int8_model_and_loads_it_as_int8(capsys, monkeypatch, tmp_path):
    import sys

    from test_generate_cli import build_model

    from nanocli import cli

    src = build_model(tmp_path)

    def nano(*args):
        monkeypatch.setattr(sys, "argv", ["nano", "generate", *map(str, args)])
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        return code, capsys.readouterr()

    code, out = nano("-m", src, "--save-quantized", tmp_path / "q")  # no --dtype int8
    assert code == 2 and out.err.startswith("error:") and out.err.count("\n") == 1 and "--dtype int8" in out.err
    code, out = nano("-m", src, "--dtype", "int8", "--save-quantized", tmp_path / "q")
    assert code == 0, out.err
    assert (tmp_path / "q" / "tokenizer.json").exists()
    code, out = nano("-m", tmp_path / "q", "--json", "--greedy", "--max-new-tokens", "4", "hi")
    assert code == 0, out.err
    assert json.loads(out.out)["dtype"] == "int8"
