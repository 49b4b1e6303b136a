"""Credential redaction for URLs and for any text that may quote one.

RTSP URLs carry passwords (`rtsp://user:pass@host/...`), and FFmpeg error messages quote the
URL they failed on. Everything framegrid prints, logs or publishes about a stream goes through
`redact_text`; a logging filter applies it once more as a safety net.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from urllib.parse import quote

# scheme://user:password@  ->  scheme://user:***@   (user kept: it helps operators, it is no secret)
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s/]*)@")
# query parameters commonly used for secrets, e.g. ?password=... or &token=...
_QUERY = re.compile(r"(?i)(?P<key>[?&](?:password|passwd|pwd|pass|token|key|secret|auth)=)(?P<val>[^&\s]*)")

MASK = "***"


def redact_text(text: str, secrets: Sequence[str] = ()) -> str:
    """Mask passwords in URLs found anywhere in `text`, and any literal secret given."""
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    out = _QUERY.sub(lambda m: f"{m['key']}{MASK}", out)
    for secret in secrets:
        if secret and len(secret) >= 3:
            out = out.replace(secret, MASK)
            enc = quote(secret, safe="")
            if enc != secret:
                out = out.replace(enc, MASK)
    return out


def url_password(url: str) -> str | None:
    """The password in a URL's user info, if any (so it can be scrubbed as a literal too)."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password or None
    except ValueError:
        return None


def redact_url(url: str) -> str:
    """The URL with its password (and secret-looking query values) masked."""
    return redact_text(url)


class RedactingFilter(logging.Filter):
    """Logging filter that redacts every record's final message (and its exception text)."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not kill logging
            message = str(record.msg)
        record.msg = redact_text(message, self.secrets)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            import traceback

            record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info)).rstrip(),
                                          self.secrets)
            record.exc_info = None
        return True
