"""Test-only fault injection, off unless the environment says `FRAMEGRID_FAULTS=1` (the soak tool and
some tests set it): an executor slot's next model call fails (`crash`) or hangs past its watchdog
(`hang`). Armed through `POST /api/faults/slots/{slot}` (a route that exists only then).

The slot machinery knows nothing of it: a pool wraps each model copy in `FaultyModel` when enabled,
and the wrapper does what was armed for its slot before calling the model."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

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


class FaultyModel:
    """A slot's model with armed faults applied before each call. A hang lasts twice the longest
    watchdog the slot can have had (its floor, or ten times the slowest call seen), so the watchdog
    fires and the abandoned call still ends."""

    def __init__(self, model: Any, slot: str, hang_floor_s: float) -> None:
        self.model = model
        self.slot = slot
        self._hang_floor_s = hang_floor_s
        self._slowest_s = 0.0

    def load(self) -> None:
        self.model.load()

    def warmup(self) -> None:
        self.model.warmup()

    def infer(self, *args: Any) -> list[Any]:
        strike(self.slot, hang_s=2 * max(self._hang_floor_s, 10 * self._slowest_s * _batch(args)))
        t0 = time.perf_counter()
        out: list[Any] = self.model.infer(*args)
        self._slowest_s = max(self._slowest_s, (time.perf_counter() - t0) / max(1, len(out)))
        return out

    def close(self) -> None:
        self.model.close()

    def __getattr__(self, name: str) -> Any:  # the backend's own facts (runtime, imgsz, ...)
        return getattr(self.model, name)


def _batch(args: tuple[Any, ...]) -> int:
    first = args[0] if args else ()
    return len(first) if hasattr(first, "__len__") else 1
