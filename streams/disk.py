"""Each writer's disk health, in one place: a full disk is a state, not a stream of errors.

A writer (the event store, snapshots, clips, the overlay, talk jobs, the avatar cache) asks for its
`DiskState` by name and reports each write: `failed(exc)` (True when the cause is a full disk or an
exhausted quota: ENOSPC, EDQUOT, SQLite's "database or disk is full") and `wrote()`. A full disk is
logged once when it starts and once when writing works again, however many writes fail between;
other write errors are logged each time by their writer. `disk_figures()` is what stats (`disk`)
and /metrics (`framegrid_disk_full`, `framegrid_disk_write_errors`) show. The states are the
process's (one disk, whichever pipeline writes to it).
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
from pathlib import Path

from typing_extensions import TypedDict  # the one pydantic reads on Python < 3.12

log = logging.getLogger(__name__)

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFigures(TypedDict):
    full: bool  # its last write failed for want of space (cleared by the next one that succeeds)
    errors: int  # writes that failed, for any reason
    held: int  # writes it holds to retry when space returns (the event store's), 0 for the others
    last_error: str | None


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
        return True
    text = str(exc).lower()
    return "no space left" in text or "database or disk is full" in text or "disk quota" in text


class DiskState:
    def __init__(self, name: str) -> None:
        self.name = name
        self.full = False
        self.errors = 0
        self.held = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def failed(self, exc: BaseException, what: str = "") -> bool:
        """Count a failed write; True when the disk is full (logged once per episode)."""
        full = is_disk_full(exc)
        with self._lock:
            self.errors += 1
            self.last_error = f"{what}: {exc}" if what else str(exc)
            started = full and not self.full
            self.full = self.full or full
        if started:
            log.error("%s: the disk is full (%s); framegrid keeps running and writes again when there is room",
                      self.name, self.last_error)
        return full

    def wrote(self) -> None:
        with self._lock:
            ended, self.full = self.full, False
        if ended:
            log.warning("%s: writing again (there is room on the disk)", self.name)

    def figures(self) -> DiskFigures:
        return {"full": self.full, "errors": self.errors, "held": self.held, "last_error": self.last_error}


_states: dict[str, DiskState] = {}
_lock = threading.Lock()


def disk_state(name: str) -> DiskState:
    """The named writer's state (made on first use)."""
    with _lock:
        state = _states.get(name)
        if state is None:
            state = _states[name] = DiskState(name)
        return state


def disk_figures() -> dict[str, DiskFigures]:
    with _lock:
        return {name: s.figures() for name, s in sorted(_states.items())}


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a crash leaves the old file or the new one: a temporary
    file in the same folder (mode 0600), fsync, rename, fsync of the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
