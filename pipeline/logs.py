"""Logging for every framegrid process (the CLI and a cluster node's worker): one format on stderr,
credentials redacted from every record, noisy libraries quietened."""

from __future__ import annotations

import logging
import sys

from pipeline.config import LogConfig, default
from streams import RedactingFilter


def setup_logging(level: str = default(LogConfig, "level"), secrets: tuple[str, ...] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("ultralytics", "amqtt", "transitions", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # aiomqtt's own logger warns "There are N pending publish calls" for every message of a burst
    # (a reconnect flushing the buffer): framegrid reports the connection itself, once
    logging.getLogger("mqtt").setLevel(logging.ERROR)
