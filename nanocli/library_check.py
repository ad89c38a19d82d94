"""``nano demo --library-check``: the model library run for real on one profile, every check with a verdict.

Two parts. ``run()`` loads every shipped profile (so a broken one fails the check). ``run_model()``
exercises the model library on one profile (``small`` by default, fp32 on CPU, a few seconds): build it,
save and reload it (logits must be bit-identical), prefill a random prompt into a ``HybridCache`` and
greedy-decode through it (the cached logits must match a full forward), and compare the cache's bytes
with ``memory.cache_bytes``. Every check is real: a failed one makes the command exit non-zero
(``LibraryCheckError``).

The pipeline in miniature (``nano demo`` without this flag) is ``demo.py``. Importing this module does
not import torch; ``run_model`` does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from nanocli_model import memory
from nanocli_model.errors import NanoError

from .profiles import GpuProfile, list_gpu_profiles, list_model_profiles, load_model_profile
from .summary import ModelSummary, summarize

DEFAULT_PROFILE = "small"
DEFAULT_OUT = Path("runs/demo-model")
PROMPT_LEN = 256
NEW_TOKENS = 64
REL_TOL = 1e-4  # cached prefill + decode vs one full forward, fp32


class LibraryCheckError(NanoError):
    """A check of ``nano demo --library-check`` failed: the model library does not do what it promises."""

    exit_code = 1


@dataclass(frozen=True)
class LibraryReport:
    """Every shipped profile, loaded."""

    models: list[ModelSummary]
    gpus: list[GpuProfile]


@dataclass(frozen=True)
class ModelRun:
    """What ``run_model`` measured and checked on one profile (fp32, CPU, batch 1)."""

    profile: str
    params: int  # counted on the built model
    expected_params: int  # memory.param_count(config).total
    out_dir: Path
    bit_exact: bool  # reloaded model's logits torch.equal the original's
    prompt_len: int
    new_tokens: int  # greedy decode steps, one token each
    max_rel_err: float  # max |cached - full| / max |full| over all prompt + generated positions
    rel_tol: float
    prefill_seconds: float
    decode_seconds: float
    cache_bytes: int  # HybridCache.nbytes()
    expected_cache_bytes: int  # memory.cache_bytes(config, 1, max_len, "fp32").total
    max_len: int
    generated: tuple[int, ...]  # the greedy token ids

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_len / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tok_s(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("inf")

    @property
    def failures(self) -> list[str]:
        """One phrase per failed check; empty when everything passed."""
        out = []
        if self.params != self.expected_params:
            out.append(f"model has {self.params:,} parameters, memory.param_count says {self.expected_params:,}")
        if not self.bit_exact:
            out.append(f"logits after save/load round trip through {self.out_dir} are not bit-exact")
        if not self.max_rel_err < self.rel_tol:  # also catches NaN
            out.append(f"cached decode logits differ from the full forward by {self.max_rel_err:.2e} "
                       f"(tolerance {self.rel_tol:.0e})")
        if self.cache_bytes != self.expected_cache_bytes:
            out.append(f"cache holds {self.cache_bytes:,} bytes, memory.cache_bytes says {self.expected_cache_bytes:,}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures


def run() -> LibraryReport:
    """Load every profile (so a broken one fails the check)."""
    models = [summarize(p.name, p.config, p.description) for p in list_model_profiles()]
    return LibraryReport(models=models, gpus=list_gpu_profiles())


def run_model(profile: str = DEFAULT_PROFILE, out_dir: str | Path = DEFAULT_OUT, prompt_len: int = PROMPT_LEN,
              new_tokens: int = NEW_TOKENS, seed: int = 0, rel_tol: float = REL_TOL) -> ModelRun:
    """Build ``profile`` (fp32, CPU), save + reload it, prefill + greedy-decode through the cache.

    Returns the measurements; the caller decides what a failed check means (``check``).
    """
    import torch

    from nanocli_model import build_model, load_pretrained, save_pretrained

    if prompt_len < 1 or new_tokens < 1:
        raise NanoError(f"the library check needs prompt_len >= 1 and new_tokens >= 1, got {prompt_len} and {new_tokens}")
    config = load_model_profile(profile).config
    out_dir = Path(out_dir)
    max_len = prompt_len + new_tokens
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=gen)

    model = build_model(config, seed=seed).eval()
    params = model.num_parameters()
    save_pretrained(model, out_dir)
    loaded = load_pretrained(out_dir)
    with torch.inference_mode():
        bit_exact = torch.equal(model(prompt), loaded(prompt))  # also warms up the loaded model
        del model

        cache = loaded.allocate_cache(batch=1, max_len=max_len)
        t0 = time.perf_counter()
        prefill_logits = loaded(prompt, cache)
        prefill_seconds = time.perf_counter() - t0

        # Greedy: each step feeds the token chosen from the previous logits, so the cache consumes
        # prompt + new_tokens positions and every one of them gets cached logits to compare.
        step_logits, tokens = [], []
        next_id = prefill_logits[:, -1].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            tokens.append(next_id)
            logits = loaded(next_id[:, None], cache)
            step_logits.append(logits)
            next_id = logits[:, -1].argmax(-1)
        decode_seconds = time.perf_counter() - t0

        generated = torch.stack(tokens, dim=1)  # (1, new_tokens)
        cached = torch.cat([prefill_logits, *step_logits], dim=1).double()
        full = loaded(torch.cat([prompt, generated], dim=1)).double()
        max_rel_err = ((cached - full).abs().max() / full.abs().max().clamp_min(1e-30)).item()

    return ModelRun(
        profile=profile, params=params, expected_params=memory.param_count(config).total, out_dir=out_dir,
        bit_exact=bit_exact, prompt_len=prompt_len, new_tokens=new_tokens, max_rel_err=max_rel_err,
        rel_tol=rel_tol, prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
        cache_bytes=cache.nbytes(), expected_cache_bytes=memory.cache_bytes(config, 1, max_len, "fp32", None).total,
        max_len=max_len, generated=tuple(generated[0].tolist()))


def check(result: ModelRun) -> None:
    """Raise ``LibraryCheckError`` (one line, exit code 1) naming every failed check of ``result``."""
    if result.failures:
        raise LibraryCheckError(f"library check failed on profile {result.profile}: " + "; ".join(result.failures))
