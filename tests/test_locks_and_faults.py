"""Issue #10, deliverables 3-6: exclusive output directories, failing writes, non-finite steps, absent or
failing GPUs. Everything in-process on the session's tiny base model (faults are injected with monkeypatch),
except one real two-process lock conflict."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanocli.report import Silent
from nanocli.stages import align as al
from nanocli.stages import distill as ds
from nanocli.stages import pretrain as pt
from nanocli.stages import prune as pr
from nanocli.train import checkpoints as ckpt
from nanocli.train import lock
from nanocli.train.loop import NonFiniteError
from nanocli_model.errors import NanoError

ROOT = Path(__file__).resolve().parent.parent
DATA = "synthetic:reasoning?docs=1500&difficulty=1-2"


def options(base: Path, out: Path, **kw) -> pt.PretrainOptions:
    o = dict(profile="tiny", data=DATA, seq_len=64, global_batch=8, steps=6, lr=3e-3, warmup=1, decay=2,
             precision="fp32", heldout_fraction=0.0, seed=3, out=str(out), cache_dir=str(base.parent / "cache"),
             tokenizer=str(base.parent / "tokenizer"))
    return pt.PretrainOptions(**{**o, **kw})


def main(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """``nano ARGS`` in this process (the console script's ``main()``): (exit code, the ``error:`` line)."""
    from nanocli import cli

    monkeypatch.setattr(sys, "argv", ["nano", *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0].rstrip()), err  # one line, the last one
    return info.value.code, errors[0]


class Said(Silent):
    """A reporter that keeps the status lines."""

    def __init__(self):
        self.lines: list[str] = []

    def status(self, message: str) -> None:
        self.lines.append(message)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def equal(a: Path, b: Path) -> bool:
    x, y = weights(a), weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def temp_dirs(out: Path) -> list[str]:
    return [p.name for p in out.glob(".*") if p.is_dir()]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------------------- 3. locks
def test_lock_names_its_owner_and_is_exclusive_within_one_process_too(tmp_path):
    out = tmp_path / "run"
    held = lock.hold(out, "nano test")
    try:
        owner = lock.read_owner(out / lock.LOCK_NAME)
        assert owner["pid"] == os.getpid() and owner["command"] == "nano test" and owner["host"]
        with pytest.raises(lock.LockedError, match=rf"in use by another nano run \(pid {os.getpid()} on "):
            lock.hold(out, "second")
    finally:
        held.release()
    assert not (out / lock.LOCK_NAME).exists() and not out.exists()  # the lock made OUT; empty, it goes again
    lock.hold(out, "third").release()  # free again


def test_second_run_on_the_same_directory_is_refused_and_the_first_is_unharmed(tiny_base, tmp_path, capsys,
                                                                                monkeypatch):
    """A real first process; the second (``nano`` in this process) fails with one line naming the first's pid."""
    out = tmp_path / "run"
    args = ["pretrain", "--profile", "tiny", "--data", DATA, "--seq-len", "64", "--global-batch", "8", "--precision",
            "fp32", "--steps", "100000", "--save-every", "2", "--heldout-fraction", "0", "--out", str(out),
            "--cache-dir", str(tiny_base.parent / "cache"), "--tokenizer", str(tiny_base.parent / "tokenizer")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "nanocli", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ckpt.list_checkpoints(out):
            time.sleep(0.05)
        assert ckpt.list_checkpoints(out), "the first run wrote no checkpoint"
        before = {p.name for p in out.iterdir()}
        code, line = main(capsys, monkeypatch, *args, "--resume", "auto")
        assert code == 2 and f"is in use by another nano run (pid {first.pid} on " in line
        assert "nano pretrain" in line and "choose another --out" in line
        assert first.poll() is None, "the first run was disturbed"
        assert {p.name for p in out.iterdir()} >= before - {n for n in before if n.startswith(".")}
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err  # stopped by SIGTERM after its checkpoint
    (step, newest), *_ = reversed(ckpt.list_checkpoints(out))
    assert ckpt.read_step(newest) == step and not (out / lock.LOCK_NAME).exists()


def test_stale_lock_of_a_dead_run_is_taken_over_with_a_status_line(tiny_base, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    (out / lock.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "started": 1.0,
                                                  "command": "nano pretrain"}))
    reporter = Said()
    r = pt.run(options(tiny_base, out, steps=2, warmup=0, decay=0), reporter)
    said = reporter.lines
    assert r.steps_done == 2 and ckpt.is_complete(out / "final")
    assert any(f"took over the lock of a run that is gone (pid {pid} on " in s for s in said), said
    assert not (out / lock.LOCK_NAME).exists()


@pytest.mark.parametrize("stage", ["pretrain", "align", "distill", "prune"])
def test_every_stage_refuses_a_directory_another_run_holds(stage, tiny_base, tmp_path):
    out = tmp_path / "out"
    base = str(tiny_base)
    held = lock.hold(out, "nano other", beside=stage == "prune")
    try:
        with pytest.raises(lock.LockedError, match=rf"pid {os.getpid()} on .*: nano other\); wait for it"):
            if stage == "pretrain":
                pt.run(options(tiny_base, out, steps=2, warmup=0, decay=0))
            elif stage == "align":
                al.run(al.AlignOptions(method="sft", model=base, data="synthetic:reasoning?docs=50&difficulty=1",
                                       seq_len=64, global_batch=4, steps=1, eval_problems=0, out=str(out)))
            elif stage == "distill":
                ds.run(ds.DistillOptions(teacher=base, student=base, data=DATA, steps=1, seq_len=64, global_batch=4,
                                         heldout_fraction=0.0, out=str(out), cache_dir=str(tiny_base.parent / "cache")))
            else:
                pr.run(pr.PruneOptions(model=base, out=str(out), hidden_size=48, calib_data=DATA, calib_samples=8,
                                       calib_seq_len=32, cache_dir=str(tiny_base.parent / "cache")))
    finally:
        held.release()
    leftovers = [p.name for p in out.iterdir()] if out.exists() else []
    assert leftovers == [], leftovers  # nothing written by the refused run


def test_prune_output_appears_whole_and_a_killed_runs_staging_is_cleared(tiny_base, tmp_path):
    out = tmp_path / "pruned"
    stale = tmp_path / ".pruned.prune-dead1"  # what a SIGKILLed prune leaves (its output never appeared)
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / f".pruned{lock.LOCK_NAME}").write_text(json.dumps({"pid": dead_pid(), "host": "h"}))
    said = []

    class Said(Silent):
        def status(self, message: str) -> None:
            said.append(message)

    pr.run(pr.PruneOptions(model=str(tiny_base), out=str(out), hidden_size=48, calib_data=DATA, calib_samples=8,
                           calib_seq_len=32, cache_dir=str(tiny_base.parent / "cache")), Said())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no staging, no lock
    assert (out / "pruning.json").is_file() and any("took over the lock" in s for s in said)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; see the injected EROFS test")
def test_read_only_output_directory_is_one_line(tiny_base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, line = main(capsys, monkeypatch, "pretrain", "--profile", "tiny", "--data", DATA, "--steps", "1",
                          "--out", str(out), "--cache-dir", str(tiny_base.parent / "cache"))
    finally:
        out.chmod(0o755)
    assert code == 2 and str(out) in line and "permission denied" in line and "choose another --out" in line


# ------------------------------------------------------------------------------------------- 4. failing writes
def _fail_from(monkeypatch, module, name: str, nth: int, error: BaseException) -> None:
    """Make ``module.name`` raise ``error`` from its ``nth`` call on (1-based)."""
    real, calls = getattr(module, name), [0]

    def failing(*a, **kw):
        calls[0] += 1
        if calls[0] >= nth:
            raise error
        return real(*a, **kw)

    monkeypatch.setattr(module, name, failing)


@pytest.mark.parametrize("where, error, cause", [
    ("trainer state", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
     "no space left on device: free space or point --out elsewhere"),
    ("safetensors", "SafetensorError", "no space left on device: free space or point --out elsewhere"),
    ("rename", OSError(errno.EROFS, os.strerror(errno.EROFS)), "read-only file system: point --out at a writable"),
])
def test_a_failed_checkpoint_write_keeps_the_previous_one_and_says_why(where, error, cause, tiny_base, tmp_path,
                                                                       monkeypatch):
    import nanocli_model.checkpoint as model_ckpt

    out = tmp_path / "run"
    if where == "trainer state":
        _fail_from(monkeypatch, ckpt.torch, "save", 3, error)
    elif where == "safetensors":
        from safetensors import SafetensorError

        error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        _fail_from(monkeypatch, model_ckpt, "save_file", 3, error)
    else:
        _fail_from(monkeypatch, model_ckpt, "_swap_into_place", 3, error)
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        pt.run(options(tiny_base, out, save_every=1, keep_last=5))
    message = str(info.value)
    assert message.startswith(f"cannot write checkpoint {out / 'checkpoint-00000003'}: {cause}"), message
    assert f"the last complete checkpoint, {out / 'checkpoint-00000002'} (step 2), is intact" in message
    assert "\n" not in message
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["checkpoint-00000001", "checkpoint-00000002"]
    assert temp_dirs(out) == [] and not (out / lock.LOCK_NAME).exists()
    monkeypatch.undo()
    # the previous checkpoint is whole: the run resumes from it and ends where an unbroken run ends
    pt.run(options(tiny_base, out, save_every=1, keep_last=5, resume="auto"))
    pt.run(options(tiny_base, tmp_path / "straight", save_every=1))
    assert equal(tmp_path / "straight" / "final", out / "final")


def test_disk_full_through_the_cli_is_one_line_exit_2(tiny_base, tmp_path, capsys, monkeypatch):
    _fail_from(monkeypatch, ckpt.torch, "save", 1, OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "run"
    code, line = main(capsys, monkeypatch, "pretrain", "--profile", "tiny", "--data", DATA, "--steps", "2",
                      "--warmup", "0", "--decay", "0", "--precision", "fp32", "--seq-len", "64", "--global-batch", "8",
                      "--out", str(out), "--cache-dir", str(tiny_base.parent / "cache"), "--tokenizer",
                      str(tiny_base.parent / "tokenizer"))
    assert code == 2
    assert line == (f"error: cannot write checkpoint {out / 'final'}: no space left on device: free space or point "
                    "--out elsewhere; no earlier checkpoint of this run exists")


def test_a_full_disk_under_the_metrics_log_is_one_line(tmp_path, monkeypatch):
    from nanocli.train.loop import MetricsLog

    class FullDisk(type(tmp_path)):
        def open(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.path = FullDisk(log.path)
    with pytest.raises(NanoError, match=r"metrics.jsonl: no space left on device: free space or point --out"):
        log.write({"step": 1})


# ------------------------------------------------------------------------------------------- 5. NaN / Inf
def _poison_loss(monkeypatch, at_call: int, grad_only: bool = False) -> None:
    """The ``at_call``-th training loss (1-based) is NaN; or, ``grad_only``, finite with a NaN gradient."""
    import nanocli_model.losses as losses

    real, calls = losses.causal_lm_loss, [0]

    def loss(model, ids, labels, *a, **kw):
        out = real(model, ids, labels, *a, **kw)
        if not torch.is_grad_enabled():
            return out
        calls[0] += 1
        if calls[0] != at_call:
            return out
        value, n = out
        if grad_only:
            value.register_hook(lambda g: torch.full_like(g, math.nan))
            return value, n
        return value * math.nan, n

    monkeypatch.setattr(losses, "causal_lm_loss", loss)


def test_on_nan_skip_drops_that_update_reports_step_and_data_and_goes_on(tiny_base, tmp_path, monkeypatch):
    _poison_loss(monkeypatch, at_call=3)
    reporter = Said()
    r = pt.run(options(tiny_base, tmp_path, save_every=1, keep_last=10, on_nan="skip"), reporter)
    said = reporter.lines
    assert r.steps_done == 6 and not r.interrupted
    ckpts = {s: p for s, p in ckpt.list_checkpoints(tmp_path)}
    assert equal(ckpts[2], ckpts[3]), "the skipped step changed the weights"
    assert not equal(ckpts[3], ckpts[4]) and not equal(ckpts[1], ckpts[2])
    skipped = [s for s in said if s.startswith("skipped")]
    assert len(skipped) == 1, said
    assert "step 3 of 6" in skipped[0] and "non-finite loss" in skipped[0]
    assert "batch plan step 2 (phase 0, sequences 16-23 of the run): synthetic window" in skipped[0]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    flagged = [m for m in rows if m.get("skipped")]
    assert [m["step"] for m in flagged] == [3] and flagged[0]["data"].startswith("batch plan step 2 ")


def test_on_nan_stop_names_step_and_data_and_keeps_the_last_checkpoint(tiny_base, tmp_path, monkeypatch):
    _poison_loss(monkeypatch, at_call=4, grad_only=True)
    with pytest.raises(NonFiniteError) as info:
        pt.run(options(tiny_base, tmp_path, save_every=1, keep_last=10))
    message = str(info.value)
    assert message.startswith("non-finite gradient at step 4 of 6 (loss ") and "grad norm nan" in message
    assert "data: batch plan step 3 (phase 0, sequences 24-31 of the run)" in message and "--on-nan skip" in message
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2, 3]
    assert not (tmp_path / lock.LOCK_NAME).exists()


def test_on_nan_stop_through_the_cli_is_one_line_exit_2(tiny_base, tmp_path, capsys, monkeypatch):
    _poison_loss(monkeypatch, at_call=1)
    code, line = main(capsys, monkeypatch, "pretrain", "--profile", "tiny", "--data", DATA, "--steps", "2",
                      "--warmup", "0", "--decay", "0", "--precision", "fp32", "--seq-len", "64", "--global-batch", "8",
                      "--out", str(tmp_path / "run"), "--cache-dir", str(tiny_base.parent / "cache"), "--tokenizer",
                      str(tiny_base.parent / "tokenizer"))
    assert code == 2 and line.startswith("error: non-finite loss at step 1 of 2") and "batch plan step 0" in line


def test_a_poisoned_weight_stops_even_with_skip(tiny_base, tmp_path, monkeypatch):
    real = pt._model

    def poisoned(*a, **k):
        model = real(*a, **k)
        with torch.no_grad():
            model.backbone.norm_f.weight[3] = math.nan
        return model

    monkeypatch.setattr(pt, "_model", poisoned)
    with pytest.raises(NonFiniteError, match=r"step 1 of 6 .*the weight backbone.norm_f.weight itself holds NaN"):
        pt.run(options(tiny_base, tmp_path, on_nan="skip"))
    assert ckpt.list_checkpoints(tmp_path) == []


def test_distill_reports_the_data_position_too(tiny_base, tmp_path, monkeypatch):
    import nanocli.train.kd as kd

    real = kd.kd_loss
    monkeypatch.setattr(kd, "kd_loss", lambda *a, **k: (lambda r: (r[0] * math.nan, *r[1:]))(real(*a, **k)))
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 1 of 2 .*data: batch plan step 0 \(phase 0"):
        ds.run(ds.DistillOptions(teacher=str(tiny_base), student=str(tiny_base), data=DATA, steps=2, seq_len=64,
                                 global_batch=4, warmup=0, heldout_fraction=0.0, precision="fp32", out=str(tmp_path),
                                 cache_dir=str(tiny_base.parent / "cache")))


# ------------------------------------------------------------------------------------------- 6. GPUs
DEVICE_COMMANDS = {
    "generate": ["generate", "hi", "--model", "{base}", "--device", "cuda"],
    "pretrain": ["pretrain", "--profile", "tiny", "--data", DATA, "--steps", "1", "--out", "{out}", "--device", "cuda"],
    "align": ["align", "--model", "{base}", "--data", "synthetic:reasoning?docs=20", "--steps", "1", "--out", "{out}",
              "--device", "cuda"],
    "distill": ["distill", "--teacher", "{base}", "--student", "{base}", "--data", DATA, "--steps", "1", "--out",
                "{out}", "--device", "cuda"],
    "distill-teacher": ["distill", "--teacher", "{base}", "--student", "{base}", "--data", DATA, "--steps", "1",
                        "--out", "{out}", "--device", "cpu", "--teacher-device", "cuda", "--heldout-fraction", "0"],
    "prune": ["prune", "--model", "{base}", "--out", "{out}", "--hidden-size", "48", "--device", "cuda"],
    "eval": ["eval", "--model", "{base}", "--device", "cuda", "-n", "1"],
    "bench": ["bench", "--model", "tiny", "--device", "cuda", "--quick"],
    "fit-check-measure": ["fit-check", "--model", "tiny", "--gpu", "a10g", "--measure"],
}


@pytest.mark.parametrize("command", list(DEVICE_COMMANDS))
def test_cuda_asked_for_but_absent_is_one_line_exit_2(command, tiny_base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    monkeypatch.setenv("NANO_CACHE", str(tiny_base.parent / "cache"))
    out = tmp_path / "out"
    args = [a.format(base=tiny_base, out=out) for a in DEVICE_COMMANDS[command]]
    code, line = main(capsys, monkeypatch, *args)
    assert code == 2 and "cuda" in line.lower() and ("no CUDA" in line or "needs a CUDA GPU" in line), line
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written


class _NVMLError(Exception):
    pass


def _fake_pynvml(fail: str) -> types.ModuleType:
    """A pynvml whose call ``fail`` raises NVMLError ('nvmlInit-os': the library fails to load, OSError)."""
    m = types.ModuleType("pynvml")
    m.NVMLError = _NVMLError

    def call(name, value=None):
        def f(*a, **k):
            if fail == name:
                raise _NVMLError("Unknown Error")
            if fail == f"{name}-os":
                raise OSError("libnvidia-ml.so.1: bad ELF")
            return value
        return f

    m.nvmlInit, m.nvmlShutdown = call("nvmlInit"), call("nvmlShutdown")
    m.nvmlDeviceGetCount = call("nvmlDeviceGetCount", 0 if fail == "no-gpu" else 1)
    m.nvmlDeviceGetHandleByIndex = call("nvmlDeviceGetHandleByIndex", object())
    m.nvmlDeviceGetName = call("nvmlDeviceGetName", b"NVIDIA L4")
    m.nvmlDeviceGetMemoryInfo = call("nvmlDeviceGetMemoryInfo", types.SimpleNamespace(total=1, free=1, used=0))
    return m


@pytest.mark.parametrize("fail, needle", [
    ("absent", "nvidia-ml-py (pynvml) is not installed"),
    ("nvmlInit", "NVML is not available (Unknown Error)"),
    ("nvmlInit-os", "NVML is not available (libnvidia-ml.so.1: bad ELF)"),
    ("no-gpu", "NVML found no NVIDIA GPU"),
    ("nvmlDeviceGetMemoryInfo", "NVML failed to read GPU 0 (Unknown Error)"),
    ("nvmlDeviceGetName", "NVML failed to read GPU 0 (Unknown Error)"),
    ("nvmlShutdown", None),  # an error while shutting down after a good answer changes nothing
])
def test_nvml_absent_or_failing_is_one_line(fail, needle, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None if fail == "absent" else _fake_pynvml(fail))
    if needle is None:
        from nanocli import nvml

        assert nvml.query_device(0).name == "NVIDIA L4"
        return
    code, line = main(capsys, monkeypatch, "fit-check", "--model", "tiny", "--gpu", "auto")
    assert code == 2 and needle in line and "--gpu PROFILE" in line, line


def _oom(*a, **k):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_oom_while_generating_names_the_settings_and_the_fit_check(tiny_base, capsys, monkeypatch):
    import nanocli_model.generation as generation

    monkeypatch.setattr(generation, "generate", _oom)
    code, line = main(capsys, monkeypatch, "generate", "hello", "--model", str(tiny_base), "--max-new-tokens", "8",
                      "--prefill-chunk", "512", "--raw")
    assert code == 2 and line.startswith("error: CUDA out of memory generating 1 sequence(s) of up to ")
    assert "--prefill-chunk" in line and "--max-new-tokens" in line and "batch" in line
    fit = line.split("`")[1]
    assert fit.startswith(f"nano fit-check --model {tiny_base} --context ") and "--prefill-chunk " in fit
    # the advice is a command that runs: the same question against a GPU profile
    code, _ = _run_fit_check(fit, capsys, monkeypatch)
    assert code == 0


def test_oom_while_pretraining_names_the_step_the_settings_and_the_fit_check(tiny_base, tmp_path, capsys,
                                                                             monkeypatch):
    import nanocli_model.losses as losses

    real, calls = losses.causal_lm_loss, [0]

    def loss(*a, **k):
        calls[0] += 1
        return _oom() if calls[0] == 3 else real(*a, **k)

    monkeypatch.setattr(losses, "causal_lm_loss", loss)
    with pytest.raises(pt.PretrainError) as info:
        pt.run(options(tiny_base, tmp_path, micro_batch=4, save_every=1))
    message = str(info.value)
    assert message.startswith("CUDA out of memory at step 2 (4 sequences x 64 tokens per forward")
    assert "lower --micro-batch" in message and "--seq-len" in message
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    fit = message.split("`")[1]
    assert fit == "nano fit-check --model tiny --context 64 --batch 4 --prefill-chunk 64 --gpu auto"
    monkeypatch.undo()
    code, _ = _run_fit_check(fit, capsys, monkeypatch)
    assert code == 0


def _run_fit_check(command: str, capsys, monkeypatch) -> tuple[int, str]:
    from nanocli import cli

    args = command.split()[1:]
    args[args.index("auto")] = "h100-80gb"  # no GPU here: the same estimate against a profile
    monkeypatch.setattr(sys, "argv", ["nano", *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    return info.value.code, capsys.readouterr().out


def test_an_oom_no_stage_translated_is_still_one_line(capsys, monkeypatch):
    from nanocli import bench

    monkeypatch.setattr(bench, "run", _oom)
    code, line = main(capsys, monkeypatch, "bench", "--model", "tiny", "--quick", "--device", "cpu")
    assert code == 2 and line.startswith("error: CUDA out of memory: lower --batch") and "nano fit-check" in line
