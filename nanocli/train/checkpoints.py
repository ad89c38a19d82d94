"""Training checkpoints: a NemotronH model directory plus the training state beside it, written atomically.

Layout of a run directory ``OUT/``::

    OUT/checkpoint-00000100/   every --save-every steps (the newest --keep-last are kept)
    OUT/final/                 at the end of the run
        config.json model.safetensors tokenizer.json tokenizer_config.json ...   (loads in nano generate,
                                                                                 transformers, vLLM)
        trainer_state.pt       optimizer state (keyed by parameter name), step, RNG states, data position
        hyperparameters.yaml   the resolved settings of the run

Each directory is assembled under a temporary dot-name and renamed into place (``save_pretrained``), so
a directory named ``checkpoint-*`` or ``final`` is always complete; a leftover ``.checkpoint-*.tmp-*``
from a killed write is never taken for a checkpoint (and is removed by the next save). A write that
fails (disk full, read-only) is a ``CheckpointWriteError`` naming the path and the cause, and leaves the
earlier checkpoints as they were. The training state is read with ``torch.load(weights_only=True)``:
tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import yaml

from nanocli_model.checkpoint import save_pretrained
from nanocli_model.errors import CheckpointError, NanoError

TRAINER_STATE = "trainer_state.pt"
HPARAMS = "hyperparameters.yaml"
FINAL = "final"
PREFIX = "checkpoint-"
FORMAT = 1


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def rng_state() -> dict:
    """Every RNG the training may touch: torch CPU, each CUDA device, Python's ``random``."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointWriteError(NanoError):
    """A checkpoint could not be written (disk full, read-only, permissions); the previous one is intact."""


def save_checkpoint(path: Path, model, trainer_state: dict, hparams: dict, side_files: Iterable[Path] = ()) -> Path:
    """Write model + tokenizer files + training state into ``path`` atomically; returns ``path``.

    A failed write (``OSError`` or a writer's error that carries an errno: disk full, read-only file
    system, permissions) removes its temporary files and is a ``CheckpointWriteError`` naming ``path``
    and the cause; whatever was complete before is untouched."""
    path = Path(path)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.state-", dir=path.parent))
        try:
            with open(scratch / TRAINER_STATE, "wb") as f:  # a file object: torch then raises OSError(errno)
                torch.save({"format": FORMAT, **trainer_state}, f)
            hold_write_open()
            (scratch / HPARAMS).write_text(yaml.safe_dump(hparams, sort_keys=False), encoding="utf-8")
            files = [scratch / TRAINER_STATE, scratch / HPARAMS, *[Path(f) for f in side_files]]
            save_pretrained(model, path, extra_files=files)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - only errors that carry an errno are translated
        reason = write_failure(e, path.parent)
        if reason is None:
            raise
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {reason}") from None
    return path


# Called at a point inside every write (training: the training state written, the model not yet; prune: its
# staging directory) with the share of a pause it may take there; None, the default, does nothing. The kill
# trials (tests/test_interrupt.py) set it in the nano processes they start, so that a SIGKILL lands in a write.
write_hold: Callable[[float], None] | None = None


def hold_write_open(share: float = 1.0) -> None:
    """A point inside a write where ``write_hold`` (when set) may hold it open."""
    if write_hold is not None:
        write_hold(share)


_ADVICE = {
    errno.ENOSPC: "no space left on device: free space or point --out elsewhere",
    errno.EDQUOT: "disk quota exceeded: free space or point --out elsewhere",
    errno.EROFS: "read-only file system: point --out at a writable directory",
    errno.EACCES: "permission denied: make {dir} writable or point --out elsewhere",
    errno.EPERM: "operation not permitted: make {dir} writable or point --out elsewhere",
    errno.EIO: "input/output error: check the disk, or point --out elsewhere",
}


def error_number(e: BaseException) -> int | None:
    """The errno of an ``OSError``, or the one a writer quotes in its message (safetensors: 'os error 28')."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    m = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(e))
    return int(m.group(1) or m.group(2)) if m else None


def write_failure(e: BaseException, directory: Path) -> str | None:
    """'no space left on device: free space or point --out elsewhere' etc., or None if ``e`` is no I/O error."""
    number = error_number(e)
    if number is None:
        return None
    if number in _ADVICE:
        return _ADVICE[number].format(dir=directory)
    return f"{os.strerror(number).lower()} (errno {number}): point --out elsewhere"


def is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / TRAINER_STATE).is_file() and any(path.glob("*.safetensors"))


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``out`` as (step, path), oldest first (``final`` sorts by its step)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for d in out.iterdir():
        if d.is_dir() and (d.name == FINAL or d.name.startswith(PREFIX)) and is_complete(d):
            found.append((read_step(d), d))
    return sorted(found, key=lambda x: (x[0], x[1].name == FINAL))


def read_step(path: Path) -> int:
    return int(load_trainer_state(path)["step"])


def load_trainer_state(path: Path) -> dict:
    f = Path(path) / TRAINER_STATE
    if not f.is_file():
        raise CheckpointError(f"{path}: no {TRAINER_STATE}; this is a model directory, not a training checkpoint "
                              "(use --model to start a new run from it)")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same answer
        raise CheckpointError(f"{f}: cannot be read ({type(e).__name__}); it is damaged, resume from an "
                              "earlier checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "step" not in state:
        raise CheckpointError(f"{f}: not a nano training state (format {FORMAT}); resume from another checkpoint")
    return state


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's weights as they are in memory: every ``state_dict`` tensor's name, dtype, shape and
    bytes, in name order. The same values give the same digest whatever files (one or sharded, any dtype
    that holds them) or path they came from; a changed value, dtype or tensor gives another. About 1.5 GB/s on one core."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def read_hparams(path: Path) -> dict:
    f = Path(path) / HPARAMS
    if not f.is_file():
        return {}
    data = yaml.safe_load(f.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def rotate(out: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` ``checkpoint-*`` dirs and stale temporary dirs; returns what went."""
    removed = []
    ckpts = [p for _, p in list_checkpoints(out) if p.name != FINAL]
    for p in ckpts[: max(len(ckpts) - keep, 0)]:
        # renamed away first (atomic), then deleted: a kill mid-delete leaves a stale .old- dir swept below,
        # never a half-deleted directory that still looks like a checkpoint
        trash = p.with_name(f".{p.name}.old-{os.getpid()}")
        try:
            p.rename(trash)
        except OSError:
            trash = p
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(p)
    for pattern in (f".{PREFIX}*.tmp-*", f".{PREFIX}*.state-*", f".{PREFIX}*.old-*", f".{FINAL}.*-*"):
        for stale in Path(out).glob(pattern):  # left by a write that was killed
            shutil.rmtree(stale, ignore_errors=True)
    return removed
