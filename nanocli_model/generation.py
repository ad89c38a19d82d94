"""Token generation: sampling, the thinking-budget controller and the batched decode loop.

Works on token ids only (no tokenizer): callers pass the ids of EOS, stop sequences and the
``</think>`` closing text. Prompts of different lengths are batched by left padding (the model keeps
padding out of every Mamba state and attention), prefilled in chunks, then decoded one token per step
into one preallocated cache and one preallocated (batch, max_new_tokens) id buffer.

Sampling follows transformers' logits-processor order: repetition penalty, temperature, top-k,
top-p, min-p, then ``torch.multinomial`` with a seeded ``torch.Generator`` (temperature 0: argmax).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

from .cache import HybridCache
from .errors import GenerationError

FINISH_REASONS = ("eos", "stop", "length")
PAD_ID = 0  # fed for left padding (masked out) and for rows that already finished (outputs ignored)


# --------------------------------------------------------------------------------------- parameters
@dataclass
class SamplingParams:
    """How to pick each next token and when to stop."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set with cumulative probability >= top_p; 1 = off
    min_p: float = 0.0  # drop tokens with prob < min_p * (max prob); 0 = off
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt + output; 1 = off
    seed: int | None = None  # None: a fresh random seed (reported in the result)
    max_new_tokens: int = 256
    eos_ids: Collection[int] = field(default_factory=frozenset)  # finish "eos" (unless ignore_eos)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    stop_token_ids: Collection[int] = field(default_factory=frozenset)  # finish "stop", even with ignore_eos

    def __post_init__(self) -> None:
        self.eos_ids = frozenset(int(i) for i in self.eos_ids)
        self.stop_token_ids = frozenset(int(i) for i in self.stop_token_ids)
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise ``GenerationError`` (one line, naming the field) for any out-of-range value."""
        checks = [
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)", self.temperature),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)", self.top_k),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)", self.min_p),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)", self.repetition_penalty),
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be an "
             "integer >= 1", self.max_new_tokens),
            (self.seed is None or isinstance(self.seed, int), "seed must be an integer", self.seed),
        ]
        for ok, message, value in checks:  # NaN fails every comparison, so it is rejected too
            if not ok:
                raise GenerationError(f"{message}, got {value!r}")


# ------------------------------------------------------------------------------ logits processors
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule for tokens already seen: positive logits / penalty, negative ones * penalty, saturating
    at the dtype's largest finite value (a penalty of 1e-45 would otherwise turn a logit into inf, and a sampled
    row with an inf into nan).

    ``logits`` (b, V) float; ``seen`` (b, V) bool mask of tokens present, or (b, n) int64 token ids.
    """
    if penalty == 1.0:
        return logits
    if seen.dtype != torch.bool:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, seen, True)  # (b, V)
    big = torch.finfo(logits.dtype).max
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty).clamp(-big, big)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits per row (ties with the k-th are kept); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (b, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to >= ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (b, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = mass_before >= p  # the set before this token already reaches p; never drops the first
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most likely token's probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)  # (b, V)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # (b, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (b,) from float logits (b, V).

    Repetition penalty (when ``seen`` is given, see ``apply_repetition_penalty``) applies in greedy
    mode too, as in transformers; temperature 0 is argmax, else temperature, top-k, top-p, min-p and
    a multinomial draw from ``generator``.
    """
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    # shifted to a maximum of 0 first (softmax, top-k, top-p and min-p do not change): a temperature as small as
    # a float allows (1e-45) then gives -inf for every other token, not inf - inf = nan
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    probs = logits.softmax(dim=-1)  # (b, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------- thinking budget
@dataclass
class _RowThinking:
    in_thinking: bool
    tokens: int = 0  # thinking tokens the model generated
    pending: list[int] = field(default_factory=list)  # forced ids still to emit
    forced_end: bool = False  # the budget ended the thinking
    generated: int = 0  # tokens observed so far (to locate the answer)
    answer_start: int | None = None  # index in the generated ids where the answer begins
    ends_in_period: bool = False  # the thinking's last non-blank token ends with a period


class ThinkingBudget:
    """The model card's thinking-budget rule, per row of a batch.

    A row is *thinking* from the start when ``in_thinking`` says so (the prompt ends inside
    ``<think>``: reasoning on) until it emits a token of ``close_ids`` itself, or until the budget
    ends it: once ``budget`` thinking tokens are generated, the thinking ends at the next generated
    token in ``newline_ids`` within ``grace`` tokens, else at ``budget + grace`` tokens. Ending means
    forcing ``think_end_ids`` (e.g. the ids of ``"\\n</think>\\n"`` or just ``</think>``) as the
    next tokens, fed through the model like generated ones (after a newline the model wrote, leading
    newline ids are skipped); then the model writes its answer.

    ``period_close_ids`` (the model card's client: the ids of ``".\n</think>\n\n"``) are forced instead of
    ``think_end_ids`` (``"\n</think>\n\n"``) unless the thinking already ends in a period: its last token
    outside ``blank_ids`` (whitespace-only tokens) is one of ``period_end_ids``. After a newline the model
    wrote, the period close is forced whole (``"...\n.\n</think>"``, as the card's client writes it), while
    the newline it wrote stands for the first one of ``think_end_ids``.

    ``budget=None`` only tracks the span (never forces). ``close_ids`` defaults to the ids of
    ``think_end_ids`` that are not newlines (the ``</think>`` token). ``generate`` calls ``start``;
    the per-row figures are in its result.
    """

    def __init__(self, budget: int | None, think_end_ids: Sequence[int], newline_ids: Collection[int],
                 grace: int = 500, *, in_thinking: bool | Sequence[bool] = True,
                 close_ids: Collection[int] | None = None, period_close_ids: Sequence[int] = (),
                 period_end_ids: Collection[int] = (), blank_ids: Collection[int] = ()):
        if budget is not None and budget < 0:
            raise GenerationError(f"thinking budget must be >= 0 tokens, got {budget}")
        if grace < 0:
            raise GenerationError(f"thinking grace must be >= 0 tokens, got {grace}")
        if not think_end_ids:
            raise GenerationError("think_end_ids is empty: give the token ids that close the thinking")
        self.budget, self.grace = budget, grace
        self.think_end_ids = [int(i) for i in think_end_ids]
        self.newline_ids = frozenset(int(i) for i in newline_ids)
        if close_ids is None:
            close_ids = set(self.think_end_ids) - self.newline_ids or set(self.think_end_ids)
        self.close_ids = frozenset(int(i) for i in close_ids)
        self.period_close_ids = [int(i) for i in period_close_ids]
        self.period_end_ids = frozenset(int(i) for i in period_end_ids)
        self.blank_ids = frozenset(int(i) for i in blank_ids)
        self.in_thinking = in_thinking
        self.rows: list[_RowThinking] = []

    def start(self, batch: int) -> None:
        """Fresh per-row state for a batch (called by ``generate``)."""
        flags = [self.in_thinking] * batch if isinstance(self.in_thinking, bool) else list(self.in_thinking)
        if len(flags) != batch:
            raise GenerationError(f"in_thinking has {len(flags)} entries for a batch of {batch} prompts")
        self.rows = [_RowThinking(bool(f), answer_start=None if f else 0) for f in flags]
        for row in self.rows:
            self._maybe_end(row)  # a budget + grace of 0 ends at once

    def forced_token(self, row: int) -> int | None:
        """The id this row must emit next, or None to sample."""
        pending = self.rows[row].pending
        return pending[0] if pending else None

    def observe(self, row: int, token: int, forced: bool) -> None:
        """Account one new token of ``row`` (sampled, or ``forced`` by this controller)."""
        r = self.rows[row]
        r.generated += 1
        if forced:
            r.pending.pop(0)
            if not r.pending:
                r.answer_start = r.generated
        elif r.in_thinking:
            if token in self.close_ids:  # the model closes its thinking itself
                r.in_thinking, r.answer_start = False, r.generated
                return
            r.tokens += 1
            if token not in self.blank_ids:
                r.ends_in_period = token in self.period_end_ids
            past_budget = self.budget is not None and r.tokens > self.budget
            self._maybe_end(r, newline=past_budget and token in self.newline_ids)

    def _maybe_end(self, r: _RowThinking, newline: bool = False) -> None:
        if not r.in_thinking or self.budget is None:
            return
        if newline or r.tokens >= self.budget + self.grace:
            period = bool(self.period_close_ids) and not r.ends_in_period
            pending = list(self.period_close_ids if period else self.think_end_ids)
            while newline and not period and len(pending) > 1 and pending[0] in self.newline_ids and pending[0] not in self.close_ids:
                pending.pop(0)  # the model just wrote a newline: the close follows it, not a second one
            r.in_thinking, r.forced_end, r.pending = False, True, pending


# ---------------------------------------------------------------------------------------- results
@dataclass
class Completion:
    """One row's output. ``token_ids`` include forced tokens and the final EOS / stop tokens."""

    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int
    thinking_tokens: int = 0  # tokens generated inside the thinking span (0 when no ThinkingBudget tracked it)
    budget_forced: bool = False  # the thinking budget inserted think_end_ids
    answer_start: int | None = 0  # index in token_ids where the answer begins (None: still thinking)


@dataclass
class GenerationResult:
    completions: list[Completion]  # one per prompt, in order
    prompt_tokens: int  # real prompt tokens, all rows (padding excluded)
    generated_tokens: int  # new tokens, all rows
    prefill_seconds: float  # prompt forward passes + the first token of every row
    decode_seconds: float  # every later step, less the time a compiled decode step spent compiling
    decode_tokens: int  # tokens produced by the decode steps (generated_tokens minus the first per row)
    peak_memory_bytes: int
    peak_memory_source: str  # "cuda max_memory_allocated" | "process peak RSS"
    seed: int  # the sampling seed used
    compile_seconds: float = 0.0  # decode steps that compiled (``decode.CompiledDecode``), not in decode_seconds

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


# ------------------------------------------------------------------------------------ generation
OnToken = Callable[[int, int, bool], "bool | None"]  # (row, token_id, forced) -> True stops that row


def generate(model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, *,
             cache: HybridCache | None = None, prefill_chunk: int = 2048, thinking: ThinkingBudget | None = None,
             stop_sequences: list[list[int]] | None = None, max_context: int | None = None,
             on_token: OnToken | None = None, decode_step: Callable | None = None) -> GenerationResult:
    """Generate up to ``params.max_new_tokens`` tokens after each prompt (token ids), batched.

    ``cache``: a ``HybridCache`` to reuse (reset here; its batch must match and its max_len suffice),
    else one is allocated. ``max_context`` (default: the model's ``max_position_embeddings``) bounds
    longest prompt + max_new_tokens. ``stop_sequences``: id sequences that end a row when its output
    ends with one. ``on_token(row, token_id, forced)`` streams every new token as it is produced; returning True
    ends that row (finish "stop"), e.g. on a stop string the caller matches in text. ``decode_step(ids (b, 1),
    cache) -> logits`` runs the one-token steps (default: the model; ``decode.CompiledDecode`` compiles them).
    """
    params.validate()
    stop_sequences = [list(s) for s in stop_sequences or [] if s]
    device = _device(model)
    ids, mask, pad = _left_pad(prompts, _vocab_size(model), device)  # (b, T), (b, T), (b,)
    b, T = ids.shape
    max_len = T + params.max_new_tokens
    cache = _prepare_cache(model, cache, b, max_len, _max_context(model, max_context), T, params)
    if prefill_chunk < 1:
        raise GenerationError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    if thinking is not None:
        thinking.start(b)
    generator = torch.Generator(device=device)
    seed = generator.manual_seed(params.seed).initial_seed() if params.seed is not None else generator.seed()
    _reset_peak_memory(device)

    step = decode_step or model
    compiled_before = getattr(step, "compile_seconds", 0.0)
    with torch.inference_mode():
        t0 = _now(device)
        logits = _prefill(model, ids, pad.to(device), cache, prefill_chunk)  # (b, V)
        seen = _seen_tokens(ids, mask, logits.shape[-1]) if params.repetition_penalty != 1.0 else None
        out = torch.full((b, params.max_new_tokens), PAD_ID, dtype=torch.long, device=device)  # (b, N)
        loop = _DecodeLoop(b, params, thinking, stop_sequences, on_token)
        t1 = None
        for t in range(params.max_new_tokens):
            if t > 0:
                logits = step(out[:, t - 1:t], cache)[:, -1]  # (b, V)
            loop.step(out[:, t], sample(logits, params, generator, seen), seen)
            if t == 0:
                t1 = _now(device)
            if loop.all_done():
                break
        t2 = _now(device)

    completions = [Completion(loop.tokens[r], loop.reasons[r] or "length", int(mask[r].sum()))
                   for r in range(b)]
    if thinking is not None:
        for c, state in zip(completions, thinking.rows):
            c.thinking_tokens, c.budget_forced, c.answer_start = state.tokens, state.forced_end, state.answer_start
    generated = sum(len(c.token_ids) for c in completions)
    peak, source = _peak_memory(device)
    compiling = getattr(step, "compile_seconds", 0.0) - compiled_before  # seconds this call spent compiling
    return GenerationResult(completions, int(mask.sum()), generated, prefill_seconds=t1 - t0,
                            decode_seconds=t2 - t1 - compiling, decode_tokens=generated - b, peak_memory_bytes=peak,
                            peak_memory_source=source, seed=seed, compile_seconds=compiling)


class _DecodeLoop:
    """Per-row bookkeeping of one decode step: forced tokens, streaming, stop conditions."""

    def __init__(self, batch: int, params: SamplingParams, thinking: ThinkingBudget | None,
                 stop_sequences: list[list[int]], on_token: OnToken | None):
        self.params, self.thinking, self.stops, self.on_token = params, thinking, stop_sequences, on_token
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.reasons: list[str | None] = [None] * batch
        self.active = list(range(batch))

    def all_done(self) -> bool:
        return not self.active

    def step(self, slot: torch.Tensor, sampled: torch.Tensor, seen: torch.Tensor | None) -> None:
        """Write this step's ids (b,) into ``slot`` (a column of the id buffer) and account each row."""
        slot.copy_(sampled)
        forced = {}
        if self.thinking is not None:
            forced = {r: f for r in self.active if (f := self.thinking.forced_token(r)) is not None}
        for r, token in forced.items():
            slot[r] = token
        finished = [r for r in range(len(self.reasons)) if self.reasons[r] is not None]
        if finished:
            slot[finished] = PAD_ID  # finished rows keep feeding padding; their outputs are ignored
        if seen is not None:
            seen.scatter_(1, slot[:, None], True)
        values = slot.tolist()
        for r in list(self.active):
            self._accept(r, values[r], r in forced)

    def _accept(self, row: int, token: int, forced: bool) -> None:
        out = self.tokens[row]
        out.append(token)
        if self.thinking is not None:
            self.thinking.observe(row, token, forced)
        halt = self.on_token is not None and self.on_token(row, token, forced) is True
        reason = "stop" if halt else self._finish_reason(out, token)
        if reason is not None:
            self.reasons[row] = reason
            self.active.remove(row)

    def _finish_reason(self, out: list[int], token: int) -> str | None:
        p = self.params
        if token in p.eos_ids and not p.ignore_eos:
            return "eos"
        if token in p.stop_token_ids or any(out[-len(s):] == s for s in self.stops):
            return "stop"
        if len(out) >= p.max_new_tokens:
            return "length"
        return None


# ------------------------------------------------------------------------------------------- steps
def _left_pad(prompts: list[list[int]], vocab: int | None,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (b, T) left-padded with PAD_ID, mask (b, T) 0/1, pad lengths (b,)."""
    if not prompts:
        raise GenerationError("no prompts to generate from")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in p if not 0 <= t < (vocab or sys.maxsize)]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary (size {vocab})")
    b, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, T), PAD_ID, dtype=torch.long)
    mask = torch.zeros((b, T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    pad = T - mask.sum(dim=1)  # (b,)
    return ids.to(device), mask.to(device), pad


def _prefill(model, ids: torch.Tensor, pad: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Run the prompts through the model in chunks of ``chunk`` tokens; the last position's logits (b, V).

    Left padding is declared to the cache once (``HybridCache.left_pad``), so no forward is longer than
    ``chunk`` (fit-check's estimate assumes so) even when one prompt is far longer than another: a chunk that
    is all padding for a row adds nothing to that row's state. Inside the padded region chunks are at least
    2 tokens (a single-token forward is a decode step, which is never padding).
    """
    T = ids.shape[1]
    max_pad = int(pad.max())
    if max_pad:
        cache.left_pad(pad)
    start = 0
    while start < T:
        n = max(chunk, 2) if start < max_pad else chunk
        logits = model(ids[:, start:start + n], cache, logits_to_keep=1)
        start += n
    return logits[:, -1]  # (b, V)


def _seen_tokens(ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(b, V) bool: which tokens each prompt holds (padding excluded), for the repetition penalty."""
    seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)  # column V: padding
    seen.scatter_(1, ids.masked_fill(mask == 0, vocab), True)
    return seen[:, :vocab]


def _prepare_cache(model, cache, batch: int, max_len: int, limit: int | None, prompt_len: int,
                   params: SamplingParams):
    if limit is not None and max_len > limit:
        raise GenerationError(f"prompt of {prompt_len} tokens + max_new_tokens {params.max_new_tokens} = "
                              f"{max_len} exceeds the context limit of {limit} tokens; shorten the prompt or "
                              "lower max_new_tokens")
    if cache is None:
        return model.allocate_cache(batch, max_len)
    if cache.batch != batch or cache.max_len < max_len:
        raise GenerationError(f"the given cache holds batch {cache.batch} x {cache.max_len} tokens; this "
                              f"request needs batch {batch} x {max_len}")
    with torch.inference_mode():
        cache.reset()
    return cache


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(iter(model.parameters()), torch.empty(0)).device


def _vocab_size(model) -> int | None:
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _max_context(model, max_context: int | None) -> int | None:
    if max_context is not None:
        return max_context
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024, "process peak RSS"
