"""``nano pretrain``: train a NemotronH model from scratch (or continue one) on text.

Steps, top to bottom:
  1. ``plan``      settings (defaults < recipe < flags, checked once) -> model config, data blend, step plan,
                   schedule: everything ``--dry-run`` prints, without touching torch or the data.
  2. the run       ``train/run.py``'s skeleton (lock, resume, loop, checkpoints, finish) with what pretrain
                   adds: the tokenizer (the checkpoint's, ``--tokenizer``, or a byte-level BPE trained on the
                   data for small profiles), the token shards and batch plan (``train/tokens.py``), the model
                   (fresh init, ``--model`` weights with their optimizer moments, or the checkpoint), the
                   causal-LM loss and the held-out loss.

Programmatic use: ``run(PretrainOptions(profile=..., data=..., out=..., steps=...), reporter)``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nanocli_model.errors import NanoError

from .. import settings
from ..report import Reporter
from ..settings import OptionError, at_least, flag
from ..train import run as skeleton
from ..train import tokens
from ..train.options import TokenTraining
from ..train.run import Job, TrainResult
from ..train.tokens import TokenPlan, token_plan

STAGE = "pretrain"
TOKENIZER_DIR = "tokenizer"
MAX_TRAINED_VOCAB = 65536  # larger vocabularies come with their tokenizer (--tokenizer), not trained here


class PretrainError(NanoError):
    """Bad input to ``nano pretrain``."""


@dataclass
class PretrainModel(settings.Group):
    panel = "Model"

    profile: str | None = None
    """Model profile to train from scratch (nano profiles)."""
    model: str | None = flag(None, aliases=("-m",))
    """A NemotronH directory (or a run directory) to continue training (e.g. a long-context phase)."""
    tokenizer: str | None = None
    """Directory with tokenizer.json (default: the model's, or trained on the data)."""
    tokenizer_vocab: int | None = None
    """BPE size when the tokenizer is trained here (default: the model's vocab_size)."""
    max_position_embeddings: int | None = None
    """Raise the model's context limit (a long-context phase)."""

    def check(self) -> None:
        if (self.profile is None) == (self.model is None):
            raise OptionError("give exactly one of --profile NAME (train from scratch) or --model DIR (continue)")
        at_least(self, 1, "tokenizer_vocab", "max_position_embeddings")


@dataclass
class PretrainOptions(TokenTraining, PretrainModel):
    """Everything ``nano pretrain`` can be told (defaults < recipe < flags)."""


@dataclass
class PretrainPlan(TokenPlan):
    """The plan of a run: what ``--dry-run`` prints."""

    options: PretrainOptions
    model_source: str  # "profile tiny" / "weights DIR"
    model_dir: Path | None  # --model's weights (a run directory: its final or newest checkpoint)

    @property
    def parameters(self) -> int:
        from nanocli_model import memory

        return memory.param_count(self.config).total


@dataclass
class PretrainResult(TrainResult):
    plan: PretrainPlan


# ------------------------------------------------------------------------------------------ 1. plan
def plan(o: PretrainOptions, world: int | None = None) -> PretrainPlan:
    """The checks before any work and the resolved run (``world``: processes, default $WORLD_SIZE)."""
    settings.validate(o, PretrainError)
    model_dir = None
    if o.profile is not None:
        from ..profiles import load_model_profile

        config, source = load_model_profile(o.profile).config, f"profile {o.profile}"
    else:
        from ..resolve import model_target

        target = model_target(o.model, "--model", kinds=("checkpoint", "run"))
        config, model_dir = target.config, target.directory
        source = f"weights {model_dir}"
    if o.max_position_embeddings is not None:
        config = config.replace(max_position_embeddings=o.max_position_embeddings)
    if o.seq_len > config.max_position_embeddings:
        raise PretrainError(f"--seq-len {o.seq_len} exceeds the model's max_position_embeddings "
                            f"({config.max_position_embeddings}); lower it or pass --max-position-embeddings")
    return token_plan(PretrainPlan, o, config, PretrainError, world, model_source=source, model_dir=model_dir)


def run(o: PretrainOptions, reporter: Reporter | None = None, planned: PretrainPlan | None = None) -> PretrainResult:
    """Plan (unless ``planned``), then train (``--dry-run``: only the plan); returns what happened."""
    return skeleton.run(planned or plan(o), PretrainResult, _Pretrain, reporter)


# ------------------------------------------------------------------------------------------ 2. the run
class _Pretrain:
    """What pretrain gives the skeleton (``train/run.py``)."""

    name, error = STAGE, PretrainError

    def __init__(self, plan: PretrainPlan, result: PretrainResult):
        self.plan, self.result = plan, result
        self.batches = self.tok_dir = None

    def host_need(self, dist, shards: int) -> list:
        from .. import host_memory as hm

        if dist.device.type != "cpu":
            return []
        return [(f"the model's {hm.TRAINED}", hm.trained(self.plan.model_dir, self.plan.config, shards))]

    def data(self, dist, reporter: Reporter) -> None:
        tokenizer, self.tok_dir = _tokenizer(self.plan, Path(self.plan.options.out), dist, reporter)
        self.batches = tokens.prepare(self.plan, tokenizer, dist, reporter)
        self.result.data = tokens.report_data(self.batches, reporter)

    def job(self, dist, reporter: Reporter, resume_from: Path | None, fresh: bool) -> Job:
        from ..train import checkpoints as ckpt
        from ..train.session import side_files

        p = self.plan
        model_dir = p.model_dir
        moments = fresh and model_dir is not None and (model_dir / ckpt.TRAINER_STATE).is_file()

        def evaluate(wrapped) -> dict:
            return tokens.heldout(p, self.batches, dist, wrapped, _lm_loss_rows)

        return tokens.job(p, self.batches, dist, _model(p, resume_from, dist), _lm_loss, side_files(self.tok_dir),
                          evaluate=evaluate if p.options.heldout_fraction > 0 else None,
                          optimizer_from=model_dir if moments else None)

    def out_of_memory(self, e: BaseException) -> PretrainError:
        return out_of_memory(self.plan, e)


def _lm_loss_rows(model, rows) -> tuple:
    from nanocli_model.losses import causal_lm_loss

    loss, n = causal_lm_loss(model, rows[:, :-1], rows[:, 1:])
    return loss, n, {}


def _lm_loss(model, batch: dict) -> tuple:
    return _lm_loss_rows(model, batch["input_ids"])


def out_of_memory(p: PretrainPlan, e: BaseException) -> PretrainError:
    """A CUDA out-of-memory error as the settings to change and the fit-check of one forward."""
    o = p.options
    step = getattr(e, "nano_step", None)
    at = f"at step {step}" if step is not None else "outside a training step (loading, evaluation)"
    model = o.profile if o.profile is not None else o.model
    return PretrainError(f"CUDA out of memory {at} ({p.micro_batch} sequences x {o.seq_len} tokens per forward, "
                         f"--precision {o.precision}): lower --micro-batch (the global batch stays, by gradient "
                         f"accumulation) or --seq-len, or shard with --parallel fsdp; `nano fit-check --model {model} "
                         f"--context {o.seq_len} --batch {p.micro_batch} --prefill-chunk {o.seq_len} --gpu auto` "
                         "shows that forward's weights and activations (training adds ~16 bytes per parameter for "
                         "gradients and AdamW state)")


def _tokenizer(p: PretrainPlan, out: Path, dist, reporter: Reporter):
    """The tokenizer and the directory its files come from (copied into every checkpoint)."""
    from nanocli_model.tokenizer import Tokenizer

    o = p.options
    if o.tokenizer is not None:
        tok_dir = Path(o.tokenizer)
    elif p.model_dir is not None and (p.model_dir / "tokenizer.json").is_file():
        tok_dir = p.model_dir
    else:
        tok_dir = out / TOKENIZER_DIR
        if dist.main and not (tok_dir / "tokenizer.json").is_file():
            _train_tokenizer(p, tok_dir, reporter)
        dist.barrier()
    tokenizer = Tokenizer.from_dir(tok_dir)
    if tokenizer.vocab_size > p.config.vocab_size:
        raise PretrainError(f"{tok_dir}: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size "
                            f"is {p.config.vocab_size}; use a matching tokenizer or a larger vocab_size")
    return tokenizer, tok_dir


def _train_tokenizer(p: PretrainPlan, tok_dir: Path, reporter: Reporter) -> None:
    from nanocli_model.checkpoint import match_umask

    from ..data import sample_texts_for_tokenizer, train_bpe_tokenizer

    vocab = p.options.tokenizer_vocab or p.config.vocab_size
    if vocab > MAX_TRAINED_VOCAB:
        raise PretrainError(f"the model's vocabulary ({vocab}) is too large to train a tokenizer here; pass "
                            "--tokenizer DIR with the released tokenizer.json")
    if vocab > p.config.vocab_size:
        raise PretrainError(f"--tokenizer-vocab {vocab} exceeds the model's vocab_size {p.config.vocab_size}")
    reporter.status(f"training a byte-level BPE tokenizer ({vocab} tokens) on the data -> {tok_dir}")
    texts = sample_texts_for_tokenizer(list(p.sources.values()), max_chars=4_000_000)
    for stale in tok_dir.parent.glob(f".{tok_dir.name}.tmp-*"):  # a killed earlier attempt (we hold the run lock)
        shutil.rmtree(stale, ignore_errors=True)
    # written beside and renamed into place: a kill never leaves a tokenizer.json without its config files
    tmp = Path(tempfile.mkdtemp(prefix=f".{tok_dir.name}.tmp-", dir=tok_dir.parent))
    try:
        train_bpe_tokenizer(texts, tmp, vocab)
        match_umask(tmp)  # mkdtemp made it 0700
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        os.rename(tmp, tok_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _model(p: PretrainPlan, resume_from: Path | None, dist):
    import torch

    from nanocli_model import build_model, load_pretrained

    source = resume_from if resume_from is not None else p.model_dir
    if source is None:
        model = build_model(p.config, dtype=torch.float32, seed=p.options.seed)
    else:
        from ..train.session import own_memory

        model = own_memory(load_pretrained(source, dtype="fp32"))
    return model.to(dist.device).train()
