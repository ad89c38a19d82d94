"""``nano distill``: logit distillation from a frozen teacher into a (pruned) student of the same tokenizer.

The report (docs/REFERENCE.md §6) recovered the pruned 9B's accuracy by distilling from the aligned 12B with
forward KL over the full vocabulary, temperature 1 and no cross-entropy term, on pretraining data mixed
with reasoning data. Those are the defaults here; reverse KL, top-k KD, a temperature and a CE mix
(``--kd-ratio``) are options. The loss itself lives in ``nanocli/train/kd.py``.

Steps, top to bottom:
  1. ``plan``     settings (defaults < recipe < flags, checked once) -> both configs, the checks before any
                  work (the teacher and student share vocab_size and tokenizer.json), data blend, steps,
                  schedule: everything ``--dry-run`` prints, without the data.
  2. the run      ``train/run.py``'s skeleton with what distillation adds: pretrain's token shards and batch
                  plan (``train/tokens.py``), the student (fp32 master weights), the teacher (frozen, eval
                  mode, ``--teacher-dtype`` on ``--teacher-device``), the optional on-disk cache of its top-k
                  logits (``train/topk_cache.py``), the student's held-out CE and KL to the teacher before and
                  after training, and ``kd_loss`` per step (KD and CE logged separately).

Programmatic use: ``run(DistillOptions(teacher=..., student=..., data=..., out=..., steps=...), reporter)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from nanocli_model.errors import NanoError

from .. import settings
from ..report import Reporter
from ..settings import OptionError
from ..train import run as skeleton
from ..train import tokens
from ..train.options import TokenTraining
from ..train.run import Job, TrainResult
from ..train.tokens import TokenPlan, token_plan

if TYPE_CHECKING:
    from ..train.topk_cache import CacheUse

STAGE = "distill"


class DistillError(NanoError):
    """Bad input to ``nano distill``."""


@dataclass
class Models(settings.Group):
    panel = "Teacher and student"

    teacher: str | None = None
    """The teacher: a NemotronH directory, or a run directory (frozen)."""
    student: str | None = None
    """The student: a NemotronH directory with the same tokenizer (e.g. pruned), or a run directory."""
    teacher_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """The teacher's dtype: auto (fp32 under --precision fp32, else bf16), fp32, bf16 or fp16."""
    teacher_device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (the student's), cpu or cuda."""
    teacher_cache: str | None = None
    """Directory caching the teacher's top-k logits per window (with --kd-top-k)."""

    def check(self) -> None:
        for role in ("teacher", "student"):
            if getattr(self, role) is None:
                raise OptionError(f"--{role} DIR is required: a NemotronH checkpoint directory")


@dataclass
class Loss(settings.Group):
    panel = "Distillation loss"

    temperature: float = 1.0
    """KD temperature T of both models' softmax, at least 0.01 (the KD term is scaled by T^2)."""
    kd_kind: Literal["forward", "reverse"] = "forward"
    """forward KL(teacher || student) or reverse KL(student || teacher)."""
    top_k: int | None = settings.flag(None, name="kd-top-k", deprecated=("--top-k",))
    """KD on the teacher's top-k tokens only (renormalised; forward KL)."""
    kd_ratio: float = 1.0
    """Weight of KD vs cross-entropy (1: KD only, the report's; 0: plain CE)."""
    kd_chunk: int = 256
    """Token rows per chunk of the fused lm_head + loss."""

    def check(self) -> None:
        from ..train.kd import check_kd_args

        check_kd_args(self.temperature, self.kd_kind, self.top_k, self.kd_ratio, self.kd_chunk)
        if self.teacher_cache is not None and self.top_k is None:
            raise OptionError("--teacher-cache stores the teacher's top-k logits; give --kd-top-k K with it")


@dataclass
class DistillOptions(TokenTraining, Loss, Models):
    """Everything ``nano distill`` can be told (defaults < recipe < flags)."""

    min_lr_divisor: ClassVar[int] = 10
    schedule: Literal["wsd", "cosine", "constant"] = "cosine"  # Minitron's distillation
    lr: float = 1e-4


@dataclass
class DistillPlan(TokenPlan):
    """The plan of a run: what ``--dry-run`` prints."""

    TRAJECTORY: ClassVar[tuple[str, ...]] = (*TokenPlan.TRAJECTORY, "teacher", "temperature", "kd_kind", "top_k",
                                             "kd_ratio", "teacher_dtype")

    options: DistillOptions
    teacher_config: Any  # NanoConfig
    teacher_dir: Path
    student_dir: Path

    @property
    def teacher_dtype(self) -> str:
        o = self.options
        return o.teacher_dtype if o.teacher_dtype != "auto" else ("fp32" if o.precision == "fp32" else "bf16")

    @property
    def loss(self) -> str:
        o = self.options
        text = f"{o.kd_kind} KL at T={o.temperature:g}" + (f", teacher top-{o.top_k}" if o.top_k else
                                                           ", full vocabulary")
        return text + (f"; {o.kd_ratio:g} x KD + {1 - o.kd_ratio:g} x CE" if o.kd_ratio < 1 else "")

    @property
    def flops_per_token(self) -> float:
        from nanocli_model import memory

        seq = self.options.seq_len
        return super().flops_per_token + memory.forward_flops(self.teacher_config, seq) / seq

    def hparams(self) -> dict:
        return {**super().hparams(), "teacher_dtype": self.teacher_dtype}


@dataclass
class DistillResult(TrainResult):
    plan: DistillPlan
    last_kd: float = float("nan")  # per-token KD of the last step
    last_ce: float = float("nan")  # per-token CE of the last step
    before: dict = field(default_factory=dict)  # held-out {eval_loss, eval_ppl, eval_kl} of the input student
    teacher_cache: CacheUse | None = None  # --teacher-cache: windows read and computed


# ------------------------------------------------------------------------------------------ 1. plan
def plan(o: DistillOptions, world: int | None = None) -> DistillPlan:
    """The checks before any work and the resolved run (``world``: processes, default $WORLD_SIZE)."""
    from ..resolve import model_target, visible_device

    settings.validate(o, DistillError)
    teacher = model_target(o.teacher, "--teacher", kinds=("checkpoint", "run"))
    student = model_target(o.student, "--student", kinds=("checkpoint", "run"))
    check_same_tokenizer(teacher.directory, student.directory, teacher.config, student.config)
    if o.top_k is not None and o.top_k > student.config.vocab_size:
        raise DistillError(f"--kd-top-k {o.top_k} exceeds the vocabulary ({student.config.vocab_size} tokens)")
    limit = min(student.config.max_position_embeddings, teacher.config.max_position_embeddings)
    if o.seq_len > limit:
        raise DistillError(f"--seq-len {o.seq_len} exceeds max_position_embeddings of the teacher or student "
                           f"({limit}); lower it")
    if o.teacher_device == "cuda":
        visible_device("cuda", "--teacher-device")  # no CUDA GPU: one line now, before any work or any file
    return token_plan(DistillPlan, o, student.config, DistillError, world, teacher_config=teacher.config,
                      teacher_dir=teacher.directory, student_dir=student.directory)


def check_same_tokenizer(teacher: Path, student: Path, teacher_config, student_config) -> None:
    """Distillation compares distributions token by token: same vocab_size and the same tokenizer.json."""
    if teacher_config.vocab_size != student_config.vocab_size:
        raise DistillError(f"the teacher's vocab_size ({teacher_config.vocab_size}) differs from the student's "
                           f"({student_config.vocab_size}); distill into a student built from the teacher")
    texts = []
    for role, d in (("teacher", teacher), ("student", student)):
        f = d / "tokenizer.json"
        if not f.is_file():
            raise DistillError(f"--{role} {d}: no tokenizer.json; copy the tokenizer files of the model it came from")
        texts.append(f.read_bytes())
    if texts[0] != texts[1]:
        try:
            same = json.loads(texts[0]) == json.loads(texts[1])  # the same tokenizer, written differently
        except (ValueError, UnicodeDecodeError):
            same = False
        if not same:
            raise DistillError(f"the tokenizers differ ({teacher / 'tokenizer.json'} vs {student / 'tokenizer.json'}); "
                               "teacher and student must share one tokenizer")


def run(o: DistillOptions, reporter: Reporter | None = None, planned: DistillPlan | None = None) -> DistillResult:
    """Plan (unless ``planned``), then train (``--dry-run``: only the plan); returns what happened."""
    return skeleton.run(planned or plan(o), DistillResult, _Distill, reporter)


# ------------------------------------------------------------------------------------------ 2. the run
class _Distill:
    """What distillation gives the skeleton (``train/run.py``)."""

    name, error = STAGE, DistillError

    def __init__(self, plan: DistillPlan, result: DistillResult):
        self.plan, self.result = plan, result
        self.batches = None

    def host_need(self, dist, shards: int) -> list:
        """The student in training and the teacher as loaded, each where it runs on the CPU."""
        from .. import host_memory as hm

        p = self.plan
        parts = []
        if dist.device.type == "cpu":
            parts.append((f"the student's {hm.TRAINED}", hm.trained(p.student_dir, p.config, shards)))
        if _teacher_device(p, dist).type == "cpu":
            parts.append((f"the teacher's {p.teacher_dtype} weights", hm.loaded(p.teacher_dir, p.teacher_dtype)))
        return parts

    def data(self, dist, reporter: Reporter) -> None:
        from nanocli_model.tokenizer import Tokenizer

        p = self.plan
        tokenizer = Tokenizer.from_dir(p.student_dir)
        if tokenizer.vocab_size > p.config.vocab_size:
            raise DistillError(f"{p.student_dir}: the tokenizer has {tokenizer.vocab_size} tokens, the models' "
                               f"vocab_size is {p.config.vocab_size}")
        self.batches = tokens.prepare(p, tokenizer, dist, reporter)
        self.result.data = tokens.report_data(self.batches, reporter)

    def job(self, dist, reporter: Reporter, resume_from: Path | None, fresh: bool) -> Job:
        import torch

        from nanocli_model import load_pretrained

        from ..train.kd import kd_loss
        from ..train.loop import autocast
        from ..train.session import own_memory, side_files
        from ..train.topk_cache import TopKCache

        p, o, result, batches = self.plan, self.plan.options, self.result, self.batches
        teacher = _teacher(p, dist, reporter)
        student = own_memory(load_pretrained(resume_from or p.student_dir, dtype="fp32")).to(dist.device).train()
        cache = TopKCache.for_teacher(p.teacher_dir, p.teacher_dtype, o.top_k, o.seq_len, o.kd_chunk,
                                      Path(o.teacher_cache), DistillError) if o.teacher_cache else None

        def score(model, rows) -> tuple:  # held-out CE and forward KL at T = 1 over the full vocabulary
            _, n, parts = kd_loss(model, teacher, rows[:, :-1], rows[:, 1:], chunk=o.kd_chunk)
            return parts["ce"], n, {"kl": parts["kd"]}

        def evaluate(model) -> dict:
            return tokens.heldout(p, batches, dist, model, score)

        if fresh and o.heldout_fraction > 0:
            reporter.status("held-out CE and KL to the teacher of the input student")
            with torch.no_grad(), autocast(o.precision, dist.device):
                result.before = evaluate(student.eval())
            student.train()
        parts = {"kd": 0.0, "ce": 0.0}
        per_rank = o.global_batch // dist.world

        def batch_fn(step: int, wrapped) -> list[dict]:
            micro = tokens.micro_batches(p, batches, step, dist)
            if cache is None:
                return micro
            ids = batches.global_batch_ids(step)[dist.rank * per_rank:(dist.rank + 1) * per_rank]
            keys = [(batches.sources[name].key, window) for name, window in ids]
            return [{**b, "keys": keys[i * p.micro_batch:(i + 1) * p.micro_batch]} for i, b in enumerate(micro)]

        def loss(model, batch: dict) -> tuple:
            ids = batch["input_ids"]
            source = cache.get(teacher, ids[:, :-1], batch["keys"]) if cache is not None else teacher
            value, n, part = kd_loss(model, source, ids[:, :-1], ids[:, 1:], temperature=o.temperature,
                                     kind=o.kd_kind, top_k=o.top_k, kd_ratio=o.kd_ratio, chunk=o.kd_chunk)
            parts["kd"] += part["kd"]
            parts["ce"] += part["ce"]
            return value, n, {}

        def metrics(m: dict) -> None:
            if "loss" in m:  # every rank gets here at the same steps: KD and CE as global per-token means
                total = dist.all_reduce_sum(torch.tensor([parts["kd"], parts["ce"]], dtype=torch.float64))
                m["kd"], m["ce"] = total[0].item() / m["tokens"], total[1].item() / m["tokens"]
                parts["kd"] = parts["ce"] = 0.0
                result.last_kd, result.last_ce = m["kd"], m["ce"]

        def finish() -> None:
            if cache is not None:
                result.teacher_cache = cache.use()

        return tokens.job(p, batches, dist, student, loss, side_files(p.student_dir), batches=batch_fn,
                          evaluate=evaluate if o.heldout_fraction > 0 else None, metrics=metrics, finish=finish)

    def out_of_memory(self, e: BaseException) -> DistillError:
        p, o = self.plan, self.plan.options
        step = getattr(e, "nano_step", None)
        at = f"at step {step}" if step else "outside a training step (loading, evaluation)"
        return DistillError(f"CUDA out of memory {at} ({p.micro_batch} sequences x {o.seq_len} tokens per forward, "
                            f"teacher {p.teacher_dtype}): lower --micro-batch or --seq-len or --kd-chunk, put the "
                            "teacher on another device (--teacher-device cpu) or cache its top-k (--kd-top-k K "
                            f"--teacher-cache DIR); `nano fit-check --model {o.teacher} --context {o.seq_len} "
                            f"--batch {p.micro_batch} --gpu auto` shows the teacher's share")


def _teacher(p: DistillPlan, dist, reporter: Reporter):
    """The frozen teacher: eval mode, no gradients, its own dtype and device (one replica per process)."""
    from nanocli_model import load_pretrained

    device = _teacher_device(p, dist)
    reporter.status(f"teacher {p.options.teacher} ({p.teacher_dtype} on {device}, frozen)")
    return load_pretrained(p.teacher_dir, dtype=p.teacher_dtype).to(device).eval().requires_grad_(False)


def _teacher_device(p: DistillPlan, dist):
    """--teacher-device: cpu, cuda (this process's GPU), or auto (the student's)."""
    import torch

    return {"cpu": torch.device("cpu"), "cuda": torch.device("cuda", dist.local_rank)}.get(
        p.options.teacher_device, dist.device)
