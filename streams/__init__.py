"""Media I/O with PyAV: live sources with reconnect, keep-latest hand-off, probing, test scenes."""

from .backoff import Backoff
from .errors import NotVideoError, SourceOpenError, StreamError, StreamStalled
from .frame import Frame
from .latest import LatestFrame
from .redact import RedactingFilter, redact_text, redact_url, url_password
from .source import (
    CONNECTING,
    ENDED,
    FAILED,
    RECONNECTING,
    STATES,
    STOPPED,
    STREAMING,
    ProbeResult,
    Source,
    SourceOptions,
    SourceState,
    is_local_file,
    probe,
)

__all__ = [
    "CONNECTING",
    "ENDED",
    "FAILED",
    "RECONNECTING",
    "STATES",
    "STOPPED",
    "STREAMING",
    "Backoff",
    "Frame",
    "LatestFrame",
    "NotVideoError",
    "ProbeResult",
    "RedactingFilter",
    "Source",
    "SourceOpenError",
    "SourceOptions",
    "SourceState",
    "StreamError",
    "StreamStalled",
    "is_local_file",
    "probe",
    "redact_text",
    "redact_url",
    "url_password",
]
