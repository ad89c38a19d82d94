"""Kill trials (issue #10): real ``nano pretrain``, ``align``, ``distill`` and ``prune`` processes are stopped
at random moments, many of them inside a checkpoint write, and nothing may be lost.

One trial per stage is a chain on one output directory:

1. (training stages) a graceful stop: SIGINT or SIGTERM once training runs -> exit 130 / 143 and a checkpoint;
2. ``KILLS`` SIGKILLs, each at a seeded random moment of one of two kinds: ``write`` (wait for the j-th next
   temporary checkpoint directory to appear, j random, then up to 0.1 s more: the kill lands inside that
   write) or ``any`` (a uniform time over the run, start-up included). After each kill: every directory
   named like a checkpoint is complete and loads, the newest holds exactly the reference run's weights of
   its step, and the partial directory of an interrupted write is never listed as a checkpoint;
3. ``--resume auto`` (prune: a rerun) finishes, and every tensor of its final safetensors is
   ``torch.equal`` to the uninterrupted reference run's; no temporary directory or lock is left.

A kill "inside a write" is counted when a temporary directory (``.checkpoint-*.tmp-*`` / ``.state-*``,
``.final.*``, prune's ``.OUT.prune-*``) is still there after the kill: proof that the write was cut.
A tiny model's write takes ~15 ms on an idle machine, so the runs go through ``tests/held_writes.py 0.1``:
each write holds 0.1 s longer (training: after the trainer state, before the model; prune: 0.05 s after its
staging directory appears and 0.05 s before the rename). nano itself has no such pause.
The bounded CI form runs one trial per stage; ``NANO_KILL_TRIALS=N`` (and ``NANO_KILLS_PER_TRIAL``) make
the soak, whose totals are printed (``pytest -s``) and, with ``NANO_KILL_REPORT=file.json``, written.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanocli.train import checkpoints as ckpt
from nanocli.train.lock import LOCK_NAME
from nanocli_model import load_pretrained

ROOT = Path(__file__).resolve().parent.parent
HELD_WRITES = Path(__file__).resolve().parent / "held_writes.py"  # nano with every write held open longer
HOLD_SECONDS = 0.1
TRIALS = int(os.environ.get("NANO_KILL_TRIALS", "1"))
KILLS = int(os.environ.get("NANO_KILLS_PER_TRIAL", "2"))
SEED = int(os.environ.get("NANO_KILL_SEED", "10"))
DATA = "synthetic:reasoning?docs=1500&difficulty=1-2"
STEPS = 14
TOTALS: dict[str, dict] = {}


# ------------------------------------------------------------------------------------------- the stages
@dataclass
class Stage:
    name: str
    graceful: bool  # a training loop: SIGINT / SIGTERM save and exit 128 + the signal
    args: list = field(default_factory=list)  # without --out / --resume / --keep-last
    keep_last: bool = False  # takes --keep-last (the reference keeps every checkpoint to compare against)

    def command(self, out: Path, resume: bool, keep: int = 2) -> list[str]:
        extra = ["--resume", "auto"] if resume and self.graceful else []
        extra += ["--keep-last", str(keep)] if self.keep_last else []
        return [sys.executable, str(HELD_WRITES), str(HOLD_SECONDS), *self.args, "--out", str(out), *extra]

    def temp_dirs(self, out: Path) -> list[Path]:
        """Temporary directories of an unfinished write (checkpoint, tokenizer, prune staging)."""
        if self.graceful:
            return [p for p in out.glob(".*") if p.is_dir() and any(t in p.name for t in (".tmp-", ".state-",
                                                                                       ".old-"))]
        return list(out.parent.glob(f".{out.name}.prune-*"))


@pytest.fixture(scope="module")
def stages(tiny_base) -> dict[str, Stage]:
    base, cache, tok = tiny_base, tiny_base.parent / "cache", tiny_base.parent / "tokenizer"
    train = ["--seq-len", "64", "--global-batch", "8", "--precision", "fp32", "--lr", "3e-3", "--save-every", "1",
             "--steps", str(STEPS)]
    return {
        "pretrain": Stage("pretrain", True, ["pretrain", "--profile", "tiny", "--data", DATA, "--tokenizer", str(tok),
                                             "--cache-dir", str(cache), "--warmup", "1", "--decay", "3",
                                             "--heldout-fraction", "0", *train], keep_last=True),
        "align": Stage("align", True, ["align", "--method", "sft", "--model", str(base), "--data",
                                       "synthetic:reasoning?docs=200&difficulty=1-2", "--eval-problems", "0", *train]),
        "distill": Stage("distill", True, ["distill", "--teacher", str(base), "--student", str(base), "--data", DATA,
                                           "--cache-dir", str(cache), "--kd-ratio", "0.5", "--warmup", "1",
                                           "--heldout-fraction", "0", *train], keep_last=True),
        "prune": Stage("prune", False, ["prune", "--model", str(base), "--hidden-size", "48", "--ffn-hidden-size",
                                        "192", "--mamba-num-heads", "6", "--num-layers", "7", "--calib-data", DATA,
                                        "--calib-samples", "32", "--calib-seq-len", "64", "--cache-dir", str(cache)]),
    }


def env() -> dict:
    # a tiny model's checkpoint is written in ~15 ms on an idle machine: held_writes.py holds every write open
    # 0.1 s longer (training: the trainer state written, the model not yet; prune: before and after its staged
    # model) so that "write" kills land inside it however busy the machine is
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT, timeout=300)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT)


def final_dir(stage: Stage, out: Path) -> Path:
    return out / ckpt.FINAL if stage.graceful else out


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_bit_identical(a: Path, b: Path) -> None:
    x, y = tensors(a), tensors(b)
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"{b} differs from {a} in {different[:3]}"


@dataclass
class Reference:
    out: Path
    startup: float  # seconds to the first write (prune: its only one)
    seconds: float  # the whole run


def reference(stage: Stage, root: Path) -> Reference:
    """The uninterrupted run, in the same process conditions as the killed ones (a subprocess, one thread)."""
    out, log = root / f"ref-{stage.name}", root / f"ref-{stage.name}.log"
    t0 = time.monotonic()
    proc = start(stage.command(out, False, keep=100), log)
    wait_for(lambda: bool(stage.temp_dirs(out)), proc, limit=300)
    startup = time.monotonic() - t0
    assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
    return Reference(out, startup, time.monotonic() - t0)


# ------------------------------------------------------------------------------------------- the checks
def check_after_kill(stage: Stage, out: Path, ref: Reference) -> None:
    """Whatever a kill left: complete checkpoints only, the newest loadable and equal to the reference's."""
    if not stage.graceful:
        if out.exists():  # prune: the output appears whole, by one rename, or not at all
            assert {"config.json", "model.safetensors", "pruning.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
            load_pretrained(out)
            assert_bit_identical(ref.out, out)
        return
    listed = ckpt.list_checkpoints(out)
    named = [p for p in (out.iterdir() if out.exists() else []) if p.is_dir() and
             (p.name == ckpt.FINAL or p.name.startswith(ckpt.PREFIX))]
    assert sorted(p for _, p in listed) == sorted(named), "a directory named like a checkpoint is incomplete"
    assert not set(stage.temp_dirs(out)) & {p for _, p in listed}
    if not listed:
        return
    step, newest = listed[-1]
    assert ckpt.load_trainer_state(newest)["step"] == step
    load_pretrained(newest)
    from nanocli.train.session import resume_point

    assert resume_point(out, "auto", RuntimeError) == newest
    same = ref.out / (ckpt.FINAL if newest.name == ckpt.FINAL else ckpt.checkpoint_name(step))
    if same.is_dir():
        assert_bit_identical(same, newest)


def steps_done(out: Path) -> int:
    try:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return 0
    return max((r["step"] for r in rows if "loss" in r), default=0)


def wait_for(cond, proc: subprocess.Popen, limit: float = 120.0) -> bool:
    """Poll ``cond`` every 2 ms while ``proc`` runs; False when it ended first."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("timed out waiting for the run")


def graceful_stop(stage: Stage, out: Path, sig: int, log: Path) -> int:
    """SIGINT/SIGTERM once training runs: exit 128 + the signal (130 / 143) with a checkpoint at the step reached."""
    proc = start(stage.command(out, True), log)
    began = wait_for(lambda: steps_done(out) >= 1, proc)
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    assert began and rc == 128 + sig, log.read_text()[-2000:]
    (step, path), *_ = reversed(ckpt.list_checkpoints(out))
    assert 1 <= step < STEPS and path.name == ckpt.checkpoint_name(step), "the stop did not write a checkpoint"
    assert steps_done(out) == step, "the checkpoint is not of the last step the run finished"
    return step


def kill_once(stage: Stage, out: Path, ref: Reference, rng: random.Random, log: Path, mode: str) -> dict:
    """One SIGKILL at a random moment of the kind ``mode``; returns what it hit."""
    done = ckpt.list_checkpoints(out)[-1][0] if stage.graceful and ckpt.list_checkpoints(out) else 0
    left = (STEPS - done) / STEPS
    proc = start(stage.command(out, True), log)
    if mode == "write":  # the (j+1)-th write of this run, up to 0.1 s into it
        skip, seen = rng.randrange(max(1, round(left * STEPS) // 2)) if stage.graceful else 0, set()

        def next_write() -> bool:
            # training: the trainer-state scratch directory, which lives through the held part of the write (not
            # a rotation's short-lived .old- directory, after which a kill lands between writes)
            seen.update(p.name for p in stage.temp_dirs(out) if ".state-" in p.name or not stage.graceful)
            return len(seen) > skip
        wait_for(next_write, proc)
        time.sleep(rng.uniform(0.0, 0.1))
    else:  # anywhere from start-up to the end this run would take
        time.sleep(rng.uniform(0.0, ref.startup + (ref.seconds - ref.startup) * left))
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    hit = bool(stage.temp_dirs(out))
    check_after_kill(stage, out, ref)
    return {"mode": mode, "in_write": hit, "finished_first": finished}


def finish(stage: Stage, out: Path, ref: Reference, log: Path) -> None:
    """``--resume auto`` (prune: a rerun, unless the output is already complete) ends bit-identical."""
    if stage.graceful or not out.exists():
        r = run(stage.command(out, True), log)
        assert r.returncode == 0, log.read_text()[-2000:]
    assert_bit_identical(final_dir(stage, ref.out), final_dir(stage, out))
    assert not stage.temp_dirs(out), "a temporary directory of a killed write was left behind"
    lock = out / LOCK_NAME if stage.graceful else out.parent / f".{out.name}{LOCK_NAME}"
    assert not lock.exists(), "the run lock was not released"
    if stage.graceful:
        logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(x)]
        assert logged == list(range(1, STEPS + 1)), "metrics.jsonl does not read as one run"


# ------------------------------------------------------------------------------------------- the trials
@pytest.mark.parametrize("name", ["pretrain", "align", "distill", "prune"])
def test_killed_runs_lose_nothing_and_resume_bit_identical(name, stages, tmp_path_factory):
    stage = stages[name]
    root = tmp_path_factory.mktemp(f"kill-{name}")
    ref = reference(stage, root)
    totals = TOTALS.setdefault(name, {"trials": 0, "kills": 0, "in_write": 0, "finished_first": 0,
                                      "graceful": 0, "bit_identical": 0, "took_over_lock": 0})
    for trial in range(TRIALS):
        rng = random.Random(f"{SEED}-{name}-{trial}")
        out = root / f"trial-{trial}" / "out"
        out.parent.mkdir()
        if stage.graceful:
            graceful_stop(stage, out, (signal.SIGINT, signal.SIGTERM)[trial % 2], out.parent / "graceful.log")
            totals["graceful"] += 1
        for k in range(KILLS):
            mode = "write" if k == 0 else rng.choice(("write", "any"))
            hit = kill_once(stage, out, ref, rng, out.parent / f"kill-{k}.log", mode)
            totals["kills"] += 1
            totals["in_write"] += hit["in_write"]
            totals["finished_first"] += hit["finished_first"]
            if not stage.graceful and out.exists():
                break  # prune finished before this kill: its output is complete, nothing left to kill
        finish(stage, out, ref, out.parent / "resume.log")
        resumed = out.parent / "resume.log"
        totals["took_over_lock"] += resumed.exists() and "took over the lock" in resumed.read_text()
        totals["trials"] += 1
        totals["bit_identical"] += 1
    print(f"\nkill trials {name}: {json.dumps(totals)}")
    report = os.environ.get("NANO_KILL_REPORT")
    if report:
        Path(report).write_text(json.dumps(TOTALS, indent=1) + "\n")
    # the mechanism really cuts writes: at least one kill per stage left a temporary directory behind
    assert totals["in_write"] >= 1, totals
