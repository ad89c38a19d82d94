"""The generation engine: sampling filters, greedy parity with transformers, batching, thinking budget."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from model_utils import randomize, tiny_config
from nanocli_model import NanoForCausalLM, load_pretrained, save_pretrained
from nanocli_model.errors import GenerationError, NanoError
from nanocli_model.generation import (
    GenerationResult,
    SamplingParams,
    ThinkingBudget,
    apply_repetition_penalty,
    generate,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _model(seed: int = 0, **overrides) -> NanoForCausalLM:
    m = NanoForCausalLM(tiny_config(**overrides)).eval()
    randomize(m, seed=seed)
    return m


def _prompts(lengths, seed=0, vocab=96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _ids(result: GenerationResult) -> list[list[int]]:
    return [c.token_ids for c in result.completions]


def _kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


# ------------------------------------------------------------------------------- logits processors
PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.5, 0.3]])  # row 1: same values, permuted
LOGITS = PROBS.log()


def test_top_k_keeps_the_k_largest():
    assert _kept(top_k_filter(LOGITS, 2)) == [{0, 1}, {2, 3}]
    assert _kept(top_k_filter(LOGITS, 1)) == [{0}, {2}]
    assert top_k_filter(LOGITS, 0) is LOGITS and top_k_filter(LOGITS, 4) is LOGITS
    assert _kept(top_k_filter(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 2)) == [{1, 2}]  # ties at the k-th kept


@pytest.mark.parametrize("p,expected", [(0.45, [{0}, {2}]), (0.75, [{0, 1}, {2, 3}]),
                                        (0.81, [{0, 1, 2}, {1, 2, 3}]), (0.99, [{0, 1, 2, 3}, {0, 1, 2, 3}]),
                                        (1.0, [{0, 1, 2, 3}, {0, 1, 2, 3}])])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert _kept(top_p_filter(LOGITS, p)) == expected


def test_top_p_always_keeps_one_token():
    assert _kept(top_p_filter(torch.tensor([[0.0, 0.0, 0.0, 5.0]]), 1e-6)) == [{3}]


@pytest.mark.parametrize("min_p,expected", [(0.0, [{0, 1, 2, 3}] * 2), (0.2, [{0, 1, 2}, {1, 2, 3}]),
                                            (0.35, [{0, 1}, {2, 3}]), (0.9, [{0}, {2}])])
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p, expected):
    assert _kept(min_p_filter(LOGITS, min_p)) == expected


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    expected = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0), expected)
    mask = torch.tensor([[True, True, False, False]])
    assert torch.equal(apply_repetition_penalty(logits, mask, 2.0), expected)
    assert apply_repetition_penalty(logits, mask, 1.0) is logits


def test_processors_match_transformers_order_and_results():
    gen_utils = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(1))
    processors = gen_utils.LogitsProcessorList([
        gen_utils.RepetitionPenaltyLogitsProcessor(1.3), gen_utils.TemperatureLogitsWarper(0.7),
        gen_utils.TopKLogitsWarper(20), gen_utils.TopPLogitsWarper(0.8), gen_utils.MinPLogitsWarper(0.05)])
    theirs = processors(ids, logits.clone())
    ours = min_p_filter(top_p_filter(top_k_filter(apply_repetition_penalty(logits, ids, 1.3) / 0.7, 20), 0.8), 0.05)
    assert _kept(ours) == _kept(theirs)
    finite = torch.isfinite(theirs)
    assert torch.allclose(ours[finite], theirs[finite])


def test_sample_greedy_and_filtered_draws():
    params = SamplingParams(temperature=0.0)
    assert sample(LOGITS, params).tolist() == [0, 2]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(LOGITS, SamplingParams(top_p=0.75), g) for _ in range(300)])  # (300, 2)
    assert set(draws[:, 0].tolist()) == {0, 1} and set(draws[:, 1].tolist()) == {2, 3}
    hot = sample(LOGITS, SamplingParams(temperature=50.0, top_k=1), g)
    assert hot.tolist() == [0, 2]
    for cold in (1e-30, 1.401298464324817e-45):  # the smallest float32 above 0 (the fuzz soak's draw): argmax
        assert sample(LOGITS, SamplingParams(temperature=cold, min_p=0.1), g).tolist() == [0, 2]


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
                                         ("min_p", 1.0), ("min_p", -0.1), ("repetition_penalty", 0.0),
                                         ("max_new_tokens", 0), ("temperature", math.nan)])
def test_invalid_sampling_values_are_one_line_errors(field, value):
    with pytest.raises(GenerationError, match=field) as info:
        SamplingParams(**{field: value})
    assert "\n" not in str(info.value)
    assert isinstance(info.value, NanoError) and isinstance(info.value, ValueError)


def test_bad_requests_are_generation_errors():
    m = _model()
    with pytest.raises(GenerationError, match="empty"):
        generate(m, [[5, 6], []], SamplingParams(**GREEDY))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(m, [[5, 600]], SamplingParams(**GREEDY))
    with pytest.raises(GenerationError, match="cache"):
        generate(m, [[5, 6]], SamplingParams(max_new_tokens=10, **GREEDY), cache=m.allocate_cache(1, 8))
    with pytest.raises(GenerationError, match="budget"):
        ThinkingBudget(-1, [5], set())


def test_max_context_error_names_the_numbers():
    m = _model()
    with pytest.raises(GenerationError, match=r"10 tokens \+ max_new_tokens 20 = 30 exceeds .* 25") as info:
        generate(m, _prompts([10, 4]), SamplingParams(max_new_tokens=20, **GREEDY), max_context=25)
    assert "\n" not in str(info.value)
    with pytest.raises(GenerationError, match="512"):  # default: the model's max_position_embeddings
        generate(m, _prompts([500]), SamplingParams(max_new_tokens=20, **GREEDY))
    generate(m, _prompts([10]), SamplingParams(max_new_tokens=15, **GREEDY), max_context=25)


# ---------------------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("pattern,groups,heads,chunk", [("M-M*-M", 2, 8, 8), ("M*M-", 1, 4, 16),
                                                        ("*-MM-M", 4, 8, 8), ("MM*-M*-", 2, 4, 8)])
def test_greedy_equals_transformers_generate(tmp_path, pattern, groups, heads, chunk):
    transformers = pytest.importorskip("transformers")
    m = _model(seed=len(pattern), hybrid_override_pattern=pattern, n_groups=groups, mamba_num_heads=heads,
               chunk_size=chunk)
    save_pretrained(m, tmp_path)
    hf = transformers.NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    ours = load_pretrained(tmp_path)
    for prompt in _prompts([13, 3], seed=len(pattern)):
        ids = torch.tensor([prompt])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                               eos_token_id=None)[0, len(prompt):].tolist()
        assert len(expected) == 24
        got = generate(ours, [prompt], SamplingParams(max_new_tokens=24, **GREEDY), prefill_chunk=5)
        assert got.completions[0].token_ids == expected


def test_an_extreme_repetition_penalty_saturates_instead_of_sampling_nan():
    """Any penalty > 0 is valid (transformers' rule): 1e-45 sends a seen positive logit past float32's range and
    1e38 a seen negative one. The penalised logits stay finite, and sampling draws among the seen positive ones."""
    logits = torch.tensor([[2.0, -10.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, True, False]])
    big = torch.finfo(torch.float32).max
    tiny = apply_repetition_penalty(logits, seen, 1.4e-45)
    assert tiny.isfinite().all() and tiny[0, 0] == tiny[0, 2] == big and -1e-40 < tiny[0, 1] < 0 and tiny[0, 3] == 3
    huge = apply_repetition_penalty(logits, seen, 1e38)  # -10 * 1e38 is past float32's range
    assert huge.isfinite().all() and huge[0, 1] == -big and 0 < huge[0, 0] < 1e-37 and huge[0, 3] == 3
    params = SamplingParams(temperature=0.6, top_p=0.95, repetition_penalty=1.4e-45, seed=0)
    draws = {sample(logits, params, torch.Generator().manual_seed(i), seen).item() for i in range(40)}
    assert draws == {0, 2}


def test_greedy_with_repetition_penalty_equals_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = _model(seed=11)
    save_pretrained(m, tmp_path)
    hf = transformers.NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    prompt = _prompts([9], seed=11)[0]
    ids = torch.tensor([prompt])
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30,
                           repetition_penalty=1.5, eos_token_id=None)[0, len(prompt):].tolist()
    got = generate(m, [prompt], SamplingParams(max_new_tokens=30, repetition_penalty=1.5, **GREEDY))
    assert got.completions[0].token_ids == expected


# ------------------------------------------------------------------------------------------ batching
@pytest.mark.parametrize("lengths,chunk", [((3, 11, 7), 2048), ((3, 11, 7), 4), ((1, 13), 3), ((6, 6), 2), ((2, 9), 1)])
def test_batched_left_padded_equals_each_prompt_alone(lengths, chunk):
    m = _model(seed=sum(lengths))
    prompts = _prompts(lengths, seed=chunk)
    params = SamplingParams(max_new_tokens=12, **GREEDY)
    batched = generate(m, prompts, params, prefill_chunk=chunk)
    alone = [generate(m, [p], params).completions[0].token_ids for p in prompts]
    assert _ids(batched) == alone
    assert batched.prompt_tokens == sum(lengths) and batched.generated_tokens == 12 * len(lengths)
    assert [c.prompt_tokens for c in batched.completions] == list(lengths)


def test_rows_finish_independently_and_a_given_cache_is_reused():
    m = _model(seed=4)
    prompts = _prompts([5, 9, 2], seed=4)
    free = _ids(generate(m, prompts, SamplingParams(max_new_tokens=16, **GREEDY)))
    eos = free[0][3]  # row 0 ends early on its 4th token
    params = SamplingParams(temperature=0.0, max_new_tokens=16, eos_ids={eos})
    cache = m.allocate_cache(3, 64)
    first = generate(m, prompts, params, cache=cache)
    again = generate(m, prompts, params, cache=cache)
    for r, c in enumerate(first.completions):
        cut = free[r].index(eos) + 1 if eos in free[r] else 16
        assert c.token_ids == free[r][:cut]
        assert c.finish_reason == ("eos" if eos in free[r] else "length")
    assert _ids(again) == _ids(first)


# -------------------------------------------------------------------------------- stopping, streaming
def test_eos_stop_ids_stop_sequences_and_ignore_eos():
    m = _model(seed=6)
    prompt = _prompts([7], seed=6)[0]
    free = generate(m, [prompt], SamplingParams(max_new_tokens=20, **GREEDY)).completions[0].token_ids

    def run(**kw):
        stops = kw.pop("stop_sequences", None)
        return generate(m, [prompt], SamplingParams(temperature=0.0, max_new_tokens=20, **kw),
                        stop_sequences=stops).completions[0]

    eos = free[5]
    cut = free.index(eos) + 1
    assert (run(eos_ids={eos}).token_ids, run(eos_ids={eos}).finish_reason) == (free[:cut], "eos")
    ignored = run(eos_ids={eos}, ignore_eos=True)
    assert (ignored.token_ids, ignored.finish_reason) == (free, "length")
    stopped = run(stop_token_ids={eos}, ignore_eos=True)
    assert (stopped.token_ids, stopped.finish_reason) == (free[:cut], "stop")
    seq = free[6:9]
    end = next(i for i in range(3, 21) if free[i - 3:i] == seq)
    by_seq = run(stop_sequences=[[999_999, 5], seq])
    assert (by_seq.token_ids, by_seq.finish_reason) == (free[:end], "stop")


def test_on_token_streams_every_token_and_timings_are_reported():
    m = _model(seed=7)
    prompts = _prompts([4, 8], seed=7)
    seen: list[tuple[int, int, bool]] = []
    result = generate(m, prompts, SamplingParams(max_new_tokens=9, **GREEDY), on_token=lambda *a: seen.append(a))
    for r, c in enumerate(result.completions):
        assert [t for row, t, forced in seen if row == r] == c.token_ids
    assert not any(forced for *_, forced in seen)
    assert result.decode_tokens == 2 * 8 and result.prefill_seconds > 0 and result.decode_seconds > 0
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    assert result.peak_memory_bytes > 10 * 2**20 and result.peak_memory_source == "process peak RSS"


def test_seeded_sampling_is_reproducible_and_differs_across_seeds():
    m = _model(seed=8)
    prompts = _prompts([5, 3], seed=8)

    def run(seed):
        return generate(m, prompts, SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=seed))

    a, b, c = run(1), run(1), run(2)
    assert _ids(a) == _ids(b) and a.seed == 1
    assert _ids(a) != _ids(c)
    assert run(None).seed != run(None).seed


# ----------------------------------------------------------------------------------- thinking budget
class Scripted(torch.nn.Module):
    """A stand-in model whose k-th call (prefill, then each decode step) favours ``scripts[row][k]``.

    It records what it is fed, so tests can check that forced tokens go through the model.
    """

    def __init__(self, scripts: list[list[int]], vocab: int = 16):
        super().__init__()
        self.scripts, self.vocab = scripts, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def allocate_cache(self, batch, max_len):
        return SimpleNamespace(batch=batch, max_len=max_len, calls=0, fed=[], reset=lambda: None)

    def forward(self, ids, cache, logits_to_keep=0, attention_mask=None):
        k = cache.calls
        cache.calls += 1
        cache.fed.append(ids[:, -1].tolist())
        logits = torch.zeros(ids.shape[0], 1, self.vocab)
        for r, script in enumerate(self.scripts):
            logits[r, 0, script[min(k, len(script) - 1)]] = 10.0
        return logits


NEWLINE, CLOSE, WORD = 7, 9, 5


def _think(model, budget, grace, max_new=20, in_thinking=True, end_ids=(NEWLINE, CLOSE)):
    streamed = []
    ctrl = ThinkingBudget(budget, list(end_ids), {NEWLINE}, grace=grace, in_thinking=in_thinking)
    cache = model.allocate_cache(len(model.scripts), 64)
    result = generate(model, [[1, 2]] * len(model.scripts), SamplingParams(max_new_tokens=max_new, **GREEDY),
                      thinking=ctrl, cache=cache, on_token=lambda *a: streamed.append(a))
    return result, streamed, cache


def test_budget_without_newline_ends_at_budget_plus_grace():
    result, streamed, cache = _think(Scripted([[WORD]]), budget=4, grace=3)
    c = result.completions[0]
    assert c.token_ids == [WORD] * 7 + [NEWLINE, CLOSE] + [WORD] * 11
    assert (c.thinking_tokens, c.budget_forced, c.answer_start) == (7, True, 9)
    assert [i for i, (_, _, forced) in enumerate(streamed) if forced] == [7, 8]
    assert [fed[0] for fed in cache.fed[1:]] == c.token_ids[:-1]  # forced ids were fed to the model


def test_budget_ends_at_the_first_newline_after_the_budget():
    script = [WORD, WORD, NEWLINE, NEWLINE, WORD, WORD, NEWLINE] + [WORD] * 30  # newlines at 3, 4 and 7
    result, streamed, _ = _think(Scripted([script]), budget=4, grace=10)
    c = result.completions[0]
    assert c.thinking_tokens == 7 and c.budget_forced
    # the model's own newline ends the line: the forced end skips its leading newline and closes at once
    assert c.token_ids[:8] == script[:7] + [CLOSE]
    assert [i for i, (_, _, forced) in enumerate(streamed) if forced] == [7]


def test_a_row_that_closes_its_thinking_itself_is_not_forced():
    scripts = [[WORD, WORD, CLOSE] + [WORD] * 30, [WORD]]  # row 0 closes after 2 tokens; row 1 never
    result, streamed, _ = _think(Scripted(scripts), budget=3, grace=2, max_new=12)
    own, cut = result.completions
    assert (own.thinking_tokens, own.budget_forced, own.answer_start) == (2, False, 3)
    assert own.token_ids == [WORD, WORD, CLOSE] + [WORD] * 9
    assert (cut.thinking_tokens, cut.budget_forced, cut.answer_start) == (5, True, 7)
    assert not any(forced for row, _, forced in streamed if row == 0)


def test_rows_outside_thinking_and_a_zero_budget():
    result, _, _ = _think(Scripted([[WORD], [WORD]]), budget=0, grace=0, max_new=4, in_thinking=[False, True])
    off, zero = result.completions
    assert off.token_ids == [WORD] * 4 and (off.thinking_tokens, off.budget_forced, off.answer_start) == (0, False, 0)
    assert zero.token_ids == [NEWLINE, CLOSE, WORD, WORD] and zero.budget_forced and zero.thinking_tokens == 0
    tracked, _, _ = _think(Scripted([[WORD]]), budget=None, grace=0, max_new=6)
    assert tracked.completions[0].thinking_tokens == 6 and tracked.completions[0].answer_start is None


def test_budget_on_a_real_model_cuts_the_span_at_budget_plus_grace():
    m = _model(seed=9)
    prompt = _prompts([6], seed=9)[0]
    free = generate(m, [prompt], SamplingParams(max_new_tokens=30, **GREEDY)).completions[0].token_ids
    close = next(t for t in range(3, 96) if t not in free)  # a "</think>" the model never writes itself
    ctrl = ThinkingBudget(5, [close], newline_ids=set(), grace=4)
    c = generate(m, [prompt], SamplingParams(max_new_tokens=30, **GREEDY), thinking=ctrl).completions[0]
    assert c.token_ids[:9] == free[:9] and c.token_ids[9] == close
    assert (c.thinking_tokens, c.budget_forced, c.answer_start) == (9, True, 10)
