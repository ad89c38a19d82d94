"""Exclusive output directories: one nano run at a time writes into a run directory.

A run takes ``OUT/.nano.lock`` before it reads or writes anything in ``OUT`` and holds it to the end
(``nano prune``, whose output directory appears whole by a rename, locks ``.OUT.nano.lock`` beside it).
The lock is an ``fcntl.flock`` on that file: the kernel drops it when its holder dies, however it dies,
so "held" always means "a live process holds it". The file's text names the owner (pid, host, start
time, command) so that a second run can say whom it waits for::

    error: runs/x is in use by another nano run (pid 4242 on node1, started 2025-01-01 12:00:00: nano
    pretrain); wait for it to finish or choose another --out

A lock file left behind by a run that died (SIGKILL, OOM killer, power loss) is held by nobody: the next
run takes it over and says so in a status line. Releasing removes the file (and the directory, when the
lock created it and nothing else was written).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nanocli_model.errors import NanoError

LOCK_NAME = ".nano.lock"

try:
    import fcntl
except ImportError:  # not POSIX: fall back to the owner's pid (see _alive)
    fcntl = None


class LockedError(NanoError):
    """The output directory belongs to another run that is still alive."""


def lock_file(out: Path, beside: bool = False) -> Path:
    """``OUT/.nano.lock``, or ``.OUT.nano.lock`` next to ``OUT`` (``beside``: for outputs that appear by rename)."""
    out = Path(out)
    return out.parent / f".{out.name}{LOCK_NAME}" if beside else out / LOCK_NAME


def read_owner(path: Path) -> dict:
    """The owner recorded in a lock file ({} when it is empty or unreadable)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    text = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {when}"
    return text + (f": {owner['command']}" if owner.get("command") else "")


def _me(what: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": what,
            "argv": sys.argv[:8]}


def _alive(owner: dict) -> bool:
    """Whether the recorded owner may still run (used only where flock is missing: a different host counts as alive)."""
    if owner.get("host") != socket.gethostname():
        return bool(owner)
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


class DirLock:
    """``acquire()`` / ``release()`` (or ``with``) the lock of one output directory."""

    def __init__(self, out: Path, what: str, status: Callable[[str], None] | None = None, beside: bool = False):
        self.out, self.what, self.status = Path(out), what, status or (lambda msg: None)
        self.path = lock_file(self.out, beside)
        self.previous: dict = {}  # the dead owner taken over, if any
        self._fd: int | None = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DirLock:
        try:
            return self._acquire()
        except OSError as e:
            self._remove_created()
            raise LockedError(f"{self.out}: cannot take the run lock {self.path.name} ({describe_os_error(e)}); "
                              "make the directory writable or choose another --out") from None
        except BaseException:
            self._remove_created()
            raise

    def _acquire(self) -> DirLock:
        self._make_dirs(self.path.parent)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock(fd):
                    owner = read_owner(self.path)
                    raise LockedError(f"{self.out} is in use by another nano run ({describe(owner)}); wait for it "
                                      "to finish or choose another --out")
                if not self._still_there(fd):  # the holder released (and removed) it while we waited: again
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            break
        try:
            previous = _read_fd(fd)
            if previous and fcntl is None and previous.get("pid") != os.getpid() and _alive(previous):
                raise LockedError(f"{self.out} is in use by another nano run ({describe(previous)}); wait for it "
                                  "to finish or choose another --out")
            _write_fd(fd, _me(self.what))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if previous:
            self.previous = previous
            self.status(f"{self.out}: took over the lock of a run that is gone ({describe(previous)})")
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._still_there(fd):
                os.unlink(self.path)  # while still locked: a waiter then finds the file gone and starts over
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the flock
        self._remove_created()

    def _remove_created(self) -> None:
        for d in reversed(self._created):  # only directories the lock itself made, and only when empty
            try:
                d.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _make_dirs(self, d: Path) -> None:
        missing = []
        while not d.exists():
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            try:
                m.mkdir()
            except FileExistsError:
                continue
            self._created.append(m)

    def _lock(self, fd: int) -> bool:
        if fcntl is None:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise  # a file system without locks: say so rather than run unprotected
        return True

    def _still_there(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False


def describe_os_error(e: OSError) -> str:
    """'no space left on device', 'read-only file system', ... (the errno's words, lower case)."""
    text = os.strerror(e.errno) if e.errno else str(e)
    return text[:1].lower() + text[1:]


def _read_fd(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        data = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except ValueError:
        return {"pid": "?", "command": "unreadable lock file"}
    return data if isinstance(data, dict) else {}


def _write_fd(fd: int, owner: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(owner) + "\n").encode("utf-8"))
    os.fsync(fd)


def hold(out: Path, what: str, status: Callable[[str], None] | None = None, beside: bool = False) -> DirLock:
    """Take the lock of ``out`` now (raises ``LockedError`` naming the owner); release it with ``.release()``."""
    return DirLock(out, what, status, beside).acquire()
