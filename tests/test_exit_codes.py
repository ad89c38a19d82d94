"""Exit codes of real ``nano`` processes (issue #19): SIGINT / SIGTERM during a training run write a checkpoint,
exit 130 / 143 and print the command that resumes the run (which, run, resumes it); a closed stdout is no
error (exit 0, or the verdict ``fit-check`` had reached, and no traceback); checkpoints and the trained
tokenizer respect the user's umask."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanocli.train import checkpoints as ckpt
from nanocli_model import load_pretrained

ROOT = Path(__file__).resolve().parent.parent
HELD_WRITES = Path(__file__).resolve().parent / "held_writes.py"  # every checkpoint write held 0.1 s longer
DATA = "synthetic:reasoning?docs=300&difficulty=1-2"
STEPS = 30


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def with_umask(mask: int):
    def set_mask() -> None:
        os.umask(mask)
    return set_mask


def metrics_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r["step"] for r in rows if "loss" in r]


def modes(root: Path) -> set[tuple[str, int]]:
    """('d' or 'f', permission bits) of ``root`` and everything under it."""
    found = {("d", stat.S_IMODE(root.stat().st_mode))}
    for p in root.rglob("*"):
        found.add(("d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode)))
    return found


# ------------------------------------------------------------------------------------------ stop signals
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_checkpoints_exits_128_plus_it_and_prints_the_resume_command(sig, tmp_path, tiny_base):
    out = tmp_path / "run"
    tokenizer = [] if sig == signal.SIGINT else ["--tokenizer", str(tiny_base.parent / "tokenizer")]  # SIGINT: trained
    args = ["pretrain", "--profile", "tiny", "--data", DATA, "--seq-len", "64", "--global-batch", "8", "--precision",
            "fp32", "--steps", str(STEPS), "--warmup", "1", "--decay", "3", "--heldout-fraction", "0", "--save-every",
            "1", "--out", str(out), "--cache-dir", str(tiny_base.parent / "cache"), *tokenizer]
    # held writes: each step takes >= 0.1 s, so the signal lands well before the run's end
    proc = subprocess.Popen([sys.executable, str(HELD_WRITES), "0.1", *args], cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=with_umask(0o022))
    deadline = time.monotonic() + 240
    while not metrics_steps(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert "Traceback" not in stderr
    (step, newest), *_ = reversed(ckpt.list_checkpoints(out))
    assert 1 <= step < STEPS and newest.name == ckpt.checkpoint_name(step)
    assert ckpt.load_trainer_state(newest)["step"] == step == metrics_steps(out)[-1]
    load_pretrained(newest)
    assert "interrupted, checkpoint written" in stdout

    # umask 022: every file 0644 and every directory 0755 (mkdtemp's 0700 and safetensors' 0600 not kept)
    assert modes(newest) == {("d", 0o755), ("f", 0o644)}
    if sig == signal.SIGINT:
        assert modes(out / "tokenizer") == {("d", 0o755), ("f", 0o644)}

    # the printed command, run as it is, resumes the run from its checkpoint to the end
    line = re.search(r"^resume with: (.+)$", stdout, re.M)
    assert line, stdout
    command = shlex.split(line.group(1))
    assert command == ["nano", "pretrain", "--out", str(out), "--resume", "auto"]
    r = subprocess.run([sys.executable, "-m", "nanocli", *command[1:]], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"training steps {step}..{STEPS}" in r.stderr
    assert metrics_steps(out) == list(range(1, STEPS + 1))
    assert ckpt.read_step(out / ckpt.FINAL) == STEPS


def test_a_second_signal_stops_at_once_with_the_same_code(tmp_path, tiny_base):
    out = tmp_path / "run"
    args = ["pretrain", "--profile", "tiny", "--data", DATA, "--seq-len", "64", "--global-batch", "8", "--precision",
            "fp32", "--steps", str(STEPS), "--heldout-fraction", "0", "--save-every", "1", "--out", str(out),
            "--cache-dir", str(tiny_base.parent / "cache"), "--tokenizer", str(tiny_base.parent / "tokenizer")]
    # each write held 1 s: the second SIGTERM lands before the first one's checkpoint is done
    proc = subprocess.Popen([sys.executable, str(HELD_WRITES), "1.0", *args], cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not metrics_steps(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.rstrip().splitlines()[-1].startswith("error: stopped at once by a second signal")
    assert "Traceback" not in stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary directory or the lock was left"


# ------------------------------------------------------------------------------------------ closed stdout
def run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """``nano ARGS`` writing into a pipe whose reader has already gone (every write: EPIPE)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "nanocli", *args], cwd=ROOT, env=env(), stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)


@pytest.mark.parametrize("args, code", [
    (["profiles"], 0),
    (["--help"], 0),
    ([], 0),  # `nano` alone prints the help
    (["pretrain", "--help"], 0),
    (["info", "tiny"], 0),
    (["fit-check", "--model", "tiny", "--gpu", "a10g"], 0),
    (["fit-check", "--model", "tiny", "--gpu", "a10g", "--json"], 0),
    # the verdict survives: the 12B at 128k does not fit an A10G (exit 1), table or JSON
    (["fit-check", "--model", "nemotron-nano-12b-v2-base", "--gpu", "a10g", "--context", "131072"], 1),
    (["fit-check", "--model", "nemotron-nano-12b-v2-base", "--gpu", "a10g", "--context", "131072", "--json"], 1),
    (["fit-check", "--model", "no-such-model", "--gpu", "a10g"], 2),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_a_closed_stdout_is_no_error(args, code):
    r = run_into_closed_pipe(*args)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr and "Exception ignored" not in r.stderr
    assert r.stderr == "" or (code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1)


@pytest.mark.parametrize("pipeline", ["nano profiles | head -1", "nano fit-check --model tiny --gpu a10g --json | "
                                      "head -c 10", "nano --help | head -1"])
def test_a_reader_that_stops_early_leaves_a_clean_pipeline(pipeline):
    nano = f"{shlex.quote(sys.executable)} -m nanocli"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline.replace("nano", nano, 1)], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout


# ------------------------------------------------------------------------------------------ umask
@pytest.mark.parametrize("mask, directory, file", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640),
                                                   (0o077, 0o700, 0o600)])
def test_checkpoints_take_the_users_umask(mask, directory, file, tmp_path, tiny_base):
    from nanocli_model import save_pretrained

    model = load_pretrained(tiny_base, dtype="fp32")
    old = os.umask(mask)
    try:
        path = save_pretrained(model, tmp_path / "model", extra_files=[tiny_base / "tokenizer.json"])
    finally:
        os.umask(old)
    assert modes(path) == {("d", directory), ("f", file)}
