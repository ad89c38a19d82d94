"""The compiled decode step (``nano generate --compile``) and the huge-page weight arena.

References: transformers' NemotronH ``generate``, a float64 eager model, ``F.linear`` in float64.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from model_utils import decode_model, needs_cxx, random_prompts
from nanocli_model import decode as D
from nanocli_model import load_pretrained, save_pretrained
from nanocli_model.generation import SamplingParams, generate
from nanocli_model.layers import project

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=20)


@pytest.fixture(scope="module")
def compiled():
    """(model, its CompiledDecode): one per module, so the suite compiles this shape once."""
    m = decode_model(seed=5)
    return m, D.CompiledDecode(m)


def test_row_dot_projection_equals_linear_in_float64():
    lin = torch.nn.Linear(24, 40, dtype=torch.float64)
    x = torch.randn(3, 1, 24, dtype=torch.float64)
    f = torch.compile(project, backend="aot_eager", fullgraph=True)  # traced: the row-dot form
    assert torch.allclose(f(lin, x), F.linear(x, lin.weight, lin.bias), rtol=1e-12, atol=1e-12)
    assert project(lin, x) is not None and torch.equal(project(lin, x), lin(x))  # eager: nn.Linear itself


def test_compiled_steps_choose_the_gemv_by_row_length():
    """Traced one-token projections: rows of ROW_GEMV_MIN_IN and more go to nano's GEMV where it is available
    (ROW_GEMV_MIN_IN_ONE_ROW and more for one row of x where the library has its one-row loop); without it, rows
    longer than ROW_DOT_MAX_IN (the released 9B's 4480 and up, faster through MKL than through the row-dot loop)
    stay a linear and shorter ones become the row-dot, as do rows shorter than those thresholds in any case
    (inductor fuses the loop with the RMSNorm before it)."""
    from nanocli_model import row_gemv
    from nanocli_model.layers import ROW_DOT_MAX_IN, ROW_GEMV_MIN_IN, ROW_GEMV_MIN_IN_ONE_ROW

    class Proj(torch.nn.Module):
        def __init__(self, inn):
            super().__init__()
            self.lin = torch.nn.Linear(inn, 8, bias=False)

        def forward(self, x):
            return project(self.lin, x)

    def traced_ops(inn, rows=1):
        program = torch.export.export(Proj(inn), (torch.randn(rows, 1, inn),), strict=False)
        return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}

    gemv, row_dot = "nano.row_gemv_f32.default", "aten.sum.dim_IntList"
    with row_gemv.use(False):
        assert "aten.linear.default" in traced_ops(ROW_DOT_MAX_IN + 1)
        short = traced_ops(ROW_DOT_MAX_IN)
        assert "aten.linear.default" not in short and row_dot in short
        assert row_dot in traced_ops(ROW_GEMV_MIN_IN_ONE_ROW)  # no one-row loop without the library
    if row_gemv.available():
        for inn in (ROW_GEMV_MIN_IN, ROW_DOT_MAX_IN, ROW_DOT_MAX_IN + 1):
            assert gemv in traced_ops(inn) and gemv in traced_ops(inn, rows=3)
    shortest = traced_ops(ROW_GEMV_MIN_IN - 1, rows=3)
    assert gemv not in shortest and row_dot in shortest
    one_row_min = ROW_GEMV_MIN_IN_ONE_ROW if row_gemv.one_row_loop() else ROW_GEMV_MIN_IN
    assert (gemv in traced_ops(one_row_min)) == row_gemv.available()
    shortest = traced_ops(one_row_min - 1)
    assert gemv not in shortest and row_dot in shortest


@needs_cxx
def test_compiled_greedy_equals_transformers_generate(tmp_path, compiled):
    transformers = pytest.importorskip("transformers")
    m, step = compiled
    save_pretrained(m, tmp_path)
    hf = transformers.NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    for prompt in random_prompts([13, 4], seed=1):
        ids = torch.tensor([prompt])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                               eos_token_id=None)[0, len(prompt):].tolist()
        got = generate(m, [prompt], GREEDY, decode_step=step)
        assert got.completions[0].token_ids == expected
    assert step.compiled and step.calls >= 38 and step.compile_seconds > 0


@needs_cxx
def test_compiled_steps_match_a_float64_model_and_batches_left_padded(compiled):
    m, step = compiled
    ref = decode_model(seed=5, dtype=torch.float64)
    prompts = random_prompts([9, 3, 6], seed=2)
    with torch.inference_mode():
        for prompt in prompts[:1]:
            cache, cache64 = m.allocate_cache(1, 30), ref.allocate_cache(1, 30)
            m(torch.tensor([prompt]), cache)
            ref(torch.tensor([prompt]), cache64)
            for t in range(12):
                tok = torch.tensor([[3 + 7 * t % 90]])
                got, want = step(tok, cache), ref(tok, cache64)
                assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
    batched = generate(m, prompts, GREEDY, decode_step=step)  # left padding through the compiled step
    alone = [generate(m, [p], GREEDY).completions[0].token_ids for p in prompts]  # eager, one by one
    assert [c.token_ids for c in batched.completions] == alone
    assert step.fallback_reason is None


def test_compile_failure_falls_back_to_eager_with_a_reason(monkeypatch):
    def broken(model, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("InductorError: C++ compile error\nlong trace")
        return call

    monkeypatch.setattr(D.torch, "compile", broken)
    m = decode_model(seed=6)
    step = D.CompiledDecode(m)
    prompt = random_prompts([7], seed=6)
    got = generate(m, prompt, GREEDY, decode_step=step)
    assert got.completions[0].token_ids == generate(decode_model(seed=6), prompt, GREEDY).completions[0].token_ids
    assert not step.compiled and step.fallback_reason.startswith("RuntimeError: InductorError: C++ compile error")
    assert "\n" not in step.fallback_reason


@pytest.mark.parametrize("column_major_tall", [False, True])
def test_huge_page_arena_keeps_values_parameters_and_training(tmp_path, column_major_tall):
    m = decode_model(seed=7)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    objects = {n: id(p) for n, p in m.named_parameters()}
    D.relayout_linear_weights(m, column_major_tall=column_major_tall)
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    if sys.platform.startswith("linux"):
        assert linears[0].weight.data_ptr() % D.HUGE_PAGE == 0  # the arena starts on a huge-page boundary
    for mod in linears:
        w = mod.weight
        tall = w.shape[0] > w.shape[1]
        assert w.stride() == ((1, w.shape[0]) if column_major_tall and tall else (w.shape[1], 1))
    for n, p in m.named_parameters():
        assert id(p) == objects[n] and torch.equal(p.detach(), before[n]), n
    # still trainable, and checkpoints round-trip
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    loss, n = m(ids[:, :-1], labels=ids[:, 1:])
    (loss / n).backward()
    opt.step()
    assert not torch.equal(m.lm_head.weight.detach(), before["lm_head.weight"])
    save_pretrained(m, tmp_path)
    back = load_pretrained(tmp_path)
    for name, p in back.named_parameters():
        assert torch.equal(p, dict(m.named_parameters())[name].detach()), name


def _tall_linears(m) -> list[torch.Tensor]:
    ws = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Linear) and mod.weight.shape[0] >
          mod.weight.shape[1]]
    assert ws  # lm_head, in_proj, up_proj: what the decode layout stores column-major
    return ws


def _train_steps(m, steps=3) -> list[float]:
    """Training steps as nano's loop takes them (clipped global gradient norm, AdamW) on a fixed batch: the
    losses and gradient norms (the weights move in place). The norm sums the gradients in memory order, and
    a gradient takes its weight's layout: on the decode layout it rounds differently."""
    from nanocli.train.optim import clip_gradients

    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    out = []
    for _ in range(steps):
        loss, n = m(ids[:, :-1], labels=ids[:, 1:])
        (loss / n).backward()
        out += [float(loss.detach()), clip_gradients(m, 1.0)]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def test_keep_training_layout_trains_as_a_model_that_never_generated():
    """The reference is the same model, freshly built, that never generated (what a resumed run trains): one
    that generated inside ``keep_training_layout`` (cached decode: tall weights column-major) trains after it
    bit for bit the same. Its next generation switches to the decode layout again, in place (the memory it
    has), and gives the same tokens as the reference's."""
    m, fresh = decode_model(seed=9), decode_model(seed=9)
    prompt = random_prompts([6], seed=4)
    objects = {n: id(p) for n, p in m.named_parameters()}
    with D.keep_training_layout(m):
        first = generate(m, prompt, GREEDY).completions[0].token_ids
        assert m._decode_layout_done and all(w.stride() == (1, w.shape[0]) for w in _tall_linears(m))
    assert not m._decode_layout_done and all(w.is_contiguous() for w in _tall_linears(m))
    assert {n: id(p) for n, p in m.named_parameters()} == objects
    assert first == generate(decode_model(seed=9), prompt, GREEDY).completions[0].token_ids
    assert _train_steps(m) == _train_steps(fresh)
    for (name, p), q in zip(m.named_parameters(), fresh.parameters()):
        assert torch.equal(p.detach(), q.detach()), name
    where = [w.data_ptr() for w in _tall_linears(m)]
    m.eval()
    fresh.eval()
    again = generate(m, prompt, GREEDY).completions[0].token_ids  # outside the scope: the decode layout stays
    assert again == generate(fresh, prompt, GREEDY).completions[0].token_ids
    assert all(w.stride() == (1, w.shape[0]) for w in _tall_linears(m)) and m._decode_layout_done
    assert [w.data_ptr() for w in _tall_linears(m)] == where  # switched in place, no second arena


@needs_cxx
def test_two_compiled_models_each_use_their_own_weights_and_shapes(compiled):
    """Guards on the modules are skipped, and dynamo keeps compiled code on the code object it traced: each
    CompiledDecode must still run its own model, also when the two differ only in a width the cache does
    not show (the MLP's), with no fallback to eager."""
    m, step = compiled
    other = decode_model(seed=8, intermediate_size=2 * m.config.intermediate_size)
    other_step = D.CompiledDecode(other)
    prompt = random_prompts([5], seed=3)
    for model, s in ((other, other_step), (m, step)):
        got = generate(model, prompt, GREEDY, decode_step=s).completions[0].token_ids
        assert got == generate(model, prompt, GREEDY).completions[0].token_ids
        assert s.compiled, s.fallback_reason
    assert generate(m, prompt, GREEDY).completions[0].token_ids != \
        generate(other, prompt, GREEDY).completions[0].token_ids
