"""Event clips: one recorder per recording stream, begun by an event's `new`, finished by its `end`.

The packets come from the stream's source (see `streams.recorder`); each finished clip's path, size
and first/last packet times go into the event store, whose media retention bounds clips and
snapshots together (`[record] max_gb`, `retain_days` per label).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from pipeline.config import RecordConfig, StreamConfig
from pipeline.payloads import EventPayload, RecorderFigures
from streams.recorder import ClipResult, StreamRecorder

from .eventstore import EventStore

log = logging.getLogger(__name__)


class Clips:
    """The recorders of one pipeline's streams and the events they are writing."""

    def __init__(self, cfg: RecordConfig, folder: Path, store: EventStore, wall: Callable[[], float]) -> None:
        self.cfg = cfg
        self.folder = folder
        self.store = store
        self.wall = wall
        self.recorders: dict[str, StreamRecorder] = {}
        self._closing: list[StreamRecorder] = []  # removed streams' recorders finishing their clips

    def recorder_for(self, name: str, cfg: StreamConfig) -> StreamRecorder | None:
        """The stream's recorder (made now), or None when it does not record."""
        rec = cfg.record
        if not rec.enabled:
            return None
        old = self.recorders.pop(name, None)
        if old is not None:
            self._retire(old)
        recorder = StreamRecorder(name, self.folder / name, rec.pre_s, rec.post_s, rec.max_clip_s,
                                  lambda result: self._done(name, result), self.wall,
                                  rec.segment_s if rec.continuous else None)
        self.recorders[name] = recorder
        return recorder

    def remove_stream(self, name: str) -> None:
        recorder = self.recorders.pop(name, None)
        if recorder is not None:
            self._retire(recorder)

    def _retire(self, recorder: StreamRecorder) -> None:
        """Its clips end at the newest packet; its writer finishes them on its own thread."""
        self._closing = [r for r in self._closing if r.writing]
        recorder.close(timeout=0)
        self._closing.append(recorder)

    def on_event(self, event: EventPayload, _obj: Any, _result: Any) -> None:
        """An event listener: `new` begins the event's clip, `end` finishes it."""
        recorder = self.recorders.get(event["stream"])
        after = event["after"]
        if recorder is None or after is None:
            return
        if event["type"] == "new":
            day = time.strftime("%Y-%m-%d", time.localtime(after["first_seen"]))
            recorder.begin(after["id"], after["first_seen"], self.folder / event["stream"] / day / f"{after['id']}.mp4")
        elif event["type"] == "end":
            recorder.finish(after["id"], after["last_seen"])

    def _done(self, stream: str, result: ClipResult) -> None:  # on a recorder's writer thread
        if result.path is None:
            return
        if result.key.startswith("segment:"):
            self.store.add_segment(stream, str(result.path), result.size, result.start, result.end)
        else:
            self.store.set_clip(result.key, str(result.path), result.size, result.start, result.end)

    def close(self, timeout: float = 15.0) -> None:
        """Finish every clip (blocking: run it off the loop)."""
        for recorder in [*self.recorders.values(), *self._closing]:
            recorder.close(timeout)
        self.recorders.clear()
        self._closing.clear()

    def figures(self) -> dict[str, RecorderFigures]:
        """Per stream: clips written and failed, bytes, the ring's size, whether the disk was full."""
        return {name: cast(RecorderFigures, r.figures()) for name, r in sorted(self.recorders.items())}
