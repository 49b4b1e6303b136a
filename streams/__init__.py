"""Media I/O with PyAV: live sources with reconnect, one-frame mailboxes, probing, test scenes."""

from .backoff import Backoff
from .clock import SYSTEM_CLOCK, Clock
from .errors import NotVideoError, SourceOpenError, StreamError, StreamStalled
from .extras import MissingExtra, require
from .frame import Frame
from .mailbox import Mailbox
from .paths import default_state_dir
from .redact import RedactingFilter, redact_text, redact_url, url_password
from .source import (
    CONNECTING,
    ENDED,
    FAILED,
    RECONNECTING,
    STOPPED,
    STREAMING,
    ProbeResult,
    Source,
    SourceSettings,
    SourceState,
    StreamState,
    is_local_file,
    probe,
)

__all__ = [
    "CONNECTING",
    "ENDED",
    "FAILED",
    "RECONNECTING",
    "STOPPED",
    "STREAMING",
    "SYSTEM_CLOCK",
    "Backoff",
    "Clock",
    "Frame",
    "Mailbox",
    "MissingExtra",
    "NotVideoError",
    "ProbeResult",
    "RedactingFilter",
    "Source",
    "SourceOpenError",
    "SourceSettings",
    "SourceState",
    "StreamError",
    "StreamStalled",
    "StreamState",
    "default_state_dir",
    "is_local_file",
    "probe",
    "redact_text",
    "redact_url",
    "require",
    "url_password",
]
