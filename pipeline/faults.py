"""Test-only fault injection, off unless the environment says `FRAMEGRID_FAULTS=1` (the soak tool and
some tests set it): an executor slot's next model call fails (`crash`) or hangs past its watchdog
(`hang`). Armed through `POST /api/faults/slots/{slot}` (a route that exists only then)."""

from __future__ import annotations

import os
import threading
import time

ENABLED = os.environ.get("FRAMEGRID_FAULTS") == "1"
KINDS = ("crash", "hang")

_lock = threading.Lock()
_armed: dict[str, str] = {}


class InjectedFault(RuntimeError):
    """The failure a `crash` fault makes a model call raise."""


def arm(slot: str, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"fault kind must be one of {', '.join(KINDS)}")
    with _lock:
        _armed[slot] = kind


def strike(slot: str, hang_s: float) -> None:
    """Called on a slot's worker thread before its model call: do what was armed for it, once."""
    if not ENABLED:
        return
    with _lock:
        kind = _armed.pop(slot, None)
    if kind == "crash":
        raise InjectedFault(f"slot {slot}: injected crash")
    if kind == "hang":
        time.sleep(hang_s)
