"""framegrid's error hierarchy. Third-party errors are mapped here, at the boundary, with
`raise ... from exc`; messages name the stream, model or slot and never carry a password.

    FramegridError
      ConfigError            invalid configuration (key paths)      pipeline.config
      PlacementError         no executor slot admits a stream/session
      SlotError              a model call on an executor slot failed
        SlotHang             ... ran far past its expected time (watchdog)
        SlotOutOfMemory      ... ran out of device memory (by type, where the backend gives one)
      PoolError              no slot of a pool could start, or the pool is closed
      RequestError           a refused change or request (the control plane maps each kind to its answer)
        NotFound             ... names something that does not exist
        Conflict             ... clashes with what exists (a duplicate name)
        Invalid              ... is malformed; `errors` lists (key path, message) pairs
        TooLarge             ... carries more than the configured bound
        Unavailable          ... cannot be served now (a broken overlay file, a full disk)

Errors carry no protocol codes: `pipeline.api` maps each kind to its HTTP status.
"""

from __future__ import annotations

import sys


class FramegridError(Exception):
    """Base of every error framegrid's pipeline raises."""


class PlacementError(FramegridError):
    """A stream or session fits on no healthy executor slot (admission control), or none is healthy."""


class SlotError(FramegridError):
    """A model call on an executor slot failed; the slot is taken out and restarted."""


class SlotHang(SlotError):
    """A batch ran far past its expected time; the worker thread is abandoned."""


class SlotOutOfMemory(SlotError):
    """The model ran out of device memory: the same frames are retried at a smaller batch."""


class PoolError(FramegridError):
    """No executor slot of a pool could start, or the pool is closed."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Out of memory, recognised by type: Python's MemoryError and torch's OutOfMemoryError.

    ONNX Runtime and OpenVINO raise no distinct type for it; their failures count as faults
    (the slot restarts), which is also right on the CPU, where they run here.
    """
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # never imported here: a process without torch has no torch OOM
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return oom is not None and isinstance(exc, oom)


def slot_error(slot: str, exc: BaseException) -> SlotError:
    """Map a backend's exception to ours (the caller raises it `from exc`)."""
    kind = SlotOutOfMemory if is_out_of_memory(exc) else SlotError
    return kind(f"slot {slot}: {exc}")


class RequestError(FramegridError):
    """A refused change or request; `errors` lists (key path, message) pairs where keys were at fault."""

    def __init__(self, message: str, errors: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class NotFound(RequestError):
    """The request names a stream, model, session, job or file that does not exist."""


class Conflict(RequestError):
    """The request clashes with what exists (a duplicate name)."""


class Invalid(RequestError):
    """The request is malformed: a bad key, value, file or combination."""


class TooLarge(RequestError):
    """The request carries more than a configured bound (an upload over `api.max_upload_mb`)."""


class Unavailable(RequestError):
    """The request cannot be served now (the overlay file is broken or cannot be written)."""
