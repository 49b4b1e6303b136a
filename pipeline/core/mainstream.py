"""A camera's main stream when its substream is detected on (`[streams.x] detect_url`).

It is never decoded continuously. Recorded (the stream's `record` on): read as packets for the
recorder by a packet-only `Source`, its latest keyframe kept. Not recorded: not read at all, but for
one keyframe at start (its size, which scales published boxes to main-stream pixels; retried with
backoff until the camera answers) and one per snapshot asked (`picture`, a connection each, the
last reused for `FRESH_S`) — what a camera server serving 32 cameras' mains would otherwise spend
on nobody. Its state (`figures`) is the stream's `main` in the API.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from pipeline.config import StreamConfig
from streams import Backoff, Clock, Source, StreamError
from streams.keyframe import Keyframe
from streams.redact import redact_text
from streams.source import PacketSink, grab_keyframe

log = logging.getLogger(__name__)

FRESH_S = 2.0  # a snapshot asked within this of the last grabbed keyframe reuses it


class MainStream:
    def __init__(self, stream: str, cfg: StreamConfig, clock: Clock, recorder: PacketSink | None) -> None:
        self.stream = stream
        self.cfg = cfg
        self.clock = clock
        self.source: Source | None = None
        if recorder is not None:
            self.source = Source(f"{stream}.main", cfg.url, lambda frame: None, None, cfg, clock=clock, decode=False)
            self.source.recorder = recorder
        self._grabbed: Keyframe | None = None
        self._grab_lock = threading.Lock()  # one connection at a time per camera
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # the last grab's failure (not recorded)
        self.grabs = 0

    @property
    def size(self) -> tuple[int, int] | None:
        if self.source is not None:
            return self.source.size
        return self._grabbed.size if self._grabbed is not None else None

    def start(self) -> None:
        if self.source is not None:
            self.source.start()
            return
        self._thread = threading.Thread(target=self._first, name=f"stream[{self.stream}].main", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.source is not None:
            self.source.stop()
        elif self._thread is not None:
            self._thread.join(self.cfg.open_timeout + self.cfg.stall_timeout + 2)

    def _first(self) -> None:
        """Grab a keyframe until one comes (its size), then leave the camera alone."""
        backoff = Backoff(self.cfg.reconnect_base, self.cfg.reconnect_cap)
        while not self._stop.is_set():
            try:
                self._grab()
                return
            except StreamError:
                self._stop.wait(backoff.next_delay())

    def _grab(self) -> Keyframe:
        with self._grab_lock:
            try:
                got = grab_keyframe(self.cfg.url, self.cfg, self.clock.wall)
            except StreamError as exc:
                self.error = redact_text(str(exc))
                log.warning("stream %s: main stream: %s", self.stream, self.error)
                raise
            self._grabbed, self.error = got, None
            self.grabs += 1
            return got

    def keyframe(self) -> Keyframe:
        """The newest keyframe: the reader's (recorded), else one grabbed now (or within `FRESH_S`).
        Blocking (a connection: call it off the event loop); raises StreamError."""
        if self.source is not None:
            if self.source.keyframe is None:
                raise StreamError(f"stream {self.stream}: no keyframe read from its main stream yet")
            return self.source.keyframe
        got = self._grabbed
        if got is not None and self.clock.wall() - got.wall < FRESH_S:
            return got
        return self._grab()

    def picture(self) -> np.ndarray:
        return self.keyframe().picture()

    def figures(self) -> dict[str, Any]:
        """How the main stream is read, for the stream's figures."""
        size = self.size
        out: dict[str, Any] = {"read": "recorded" if self.source is not None else "on demand",
                               "size": list(size) if size else None}
        if self.source is not None:
            st = self.source.state
            out.update(state=st.state.value, since=round(st.since, 3), reconnects=st.reconnects, error=st.error,
                       packets=self.source.packets)
            key = self.source.keyframe
        else:
            retrying = self._thread is not None and self._thread.is_alive()
            failing = "reconnecting" if retrying else "failed"
            state = failing if self.error else "ok" if self._grabbed else "connecting"
            out.update(state=state, error=self.error, grabs=self.grabs)
            key = self._grabbed
        out["keyframe_age_s"] = round(self.clock.wall() - key.wall, 1) if key is not None else None
        return out
