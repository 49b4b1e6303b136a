"""Each event's best frame: a JPEG crop of the object and the full frame with its box.

An event listener. While an object lives, its best view so far (highest score, less for a box
cut by the frame's edge) is encoded, off the loop, at most once a second; when its event ends the
JPEGs are written under `<events dir>/<stream>/` and their paths go to the store. Per stream at
most `max_snapshots` are kept on disk (oldest deleted first).

Each view waiting to be encoded holds its whole frame (6 MB at 1080p), so the encoder's queue is
bounded: a view superseded before its turn is cancelled, and while `MAX_PENDING` views wait a new
one is skipped (counted; the object keeps its best view so far). Under overload, objects come and
go faster than one thread encodes them; an unbounded queue grew by ~30 MB/s with 32 cameras.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from pipeline.payloads import EventPayload

if TYPE_CHECKING:
    from pipeline.core.results import Result
    from pipeline.mqtt.publisher import Publisher

    from .events import TrackedObject
    from .eventstore import EventStore

from streams.disk import disk_state

log = logging.getLogger(__name__)

EDGE_PENALTY = 0.8  # a box touching the frame's edge is probably cut: its view counts for less
MIN_INTERVAL_S = 1.0
MAX_FULL_SIDE = 1280
MAX_PENDING = 8  # views waiting for the encoder at most (each holds its frame)


def view_quality(box: list[float], score: float, width: int, height: int) -> float:
    x1, y1, x2, y2 = box
    cut = x1 <= 2 or y1 <= 2 or x2 >= width - 2 or y2 >= height - 2
    return score * (EDGE_PENALTY if cut else 1.0)


def encode(image: np.ndarray, box: list[float]) -> tuple[bytes, bytes]:
    """(crop, full frame with the box) as JPEG."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box
    pad = 0.1 * max(x2 - x1, y2 - y1)
    cx1, cy1 = max(0, int(x1 - pad)), max(0, int(y1 - pad))
    cx2, cy2 = min(w, int(x2 + pad) + 1), min(h, int(y2 + pad) + 1)
    crop = image[cy1:cy2, cx1:cx2]
    scale = min(1.0, MAX_FULL_SIDE / max(h, w))
    full = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) if scale < 1 \
        else image.copy()
    thick = max(2, round(max(full.shape[:2]) / 300))
    cv2.rectangle(full, (round(x1 * scale), round(y1 * scale)), (round(x2 * scale), round(y2 * scale)),
                  (0, 255, 0), thick)
    ok1, c = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
    ok2, f = cv2.imencode(".jpg", full, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not (ok1 and ok2):
        raise RuntimeError("JPEG encoding failed")
    return c.tobytes(), f.tobytes()


def _encode_held(held: list[Any], box: list[float]) -> tuple[bytes, bytes]:
    image = held.pop()  # the frame is let go once encoded
    return encode(image, box)


class Snapshots:
    """The listener: keeps the best view per live object, writes it when its event ends."""

    def __init__(self, folder: Path, max_per_stream: int, store: EventStore | None = None,
                 publisher: Publisher | None = None, mqtt: bool = False,
                 on_loop: Callable[..., None] | None = None) -> None:
        self.folder = folder
        self.max_per_stream = max_per_stream
        self.store = store
        self.publisher = publisher
        self.mqtt = mqtt
        self.on_loop = on_loop  # (fn, *args): run fn on the loop (the publisher is the loop's)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshots")
        # id -> quality, at, jpegs, and the view's frame while it waits ([image]; emptied when cancelled: a
        # cancelled work item stays in the executor's queue until its turn, and must not hold the frame)
        self._best: dict[str, tuple[float, float, Future[tuple[bytes, bytes]], list[Any]]] = {}
        self._kept: dict[str, deque[tuple[str, Path, Path]]] = {}  # stream -> (id, crop, frame), oldest first
        self.written = 0
        self.disk = disk_state("snapshots")
        self.skipped = 0  # views not encoded because MAX_PENDING were waiting
        self._pending = 0  # views submitted and not yet encoded or cancelled (the loop adds, the encoder takes)
        self._lock = threading.Lock()

    def live(self, event_id: str) -> tuple[bytes, bytes] | None:
        got = self._best.get(event_id)
        if got is None or not got[2].done() or got[2].exception() is not None:
            return None
        return got[2].result()

    def __call__(self, event: EventPayload, obj: TrackedObject, result: Result | None) -> None:
        if event["type"] == "end":
            self._finish(obj)
            return
        if result is None:
            return
        w, h = obj.frame_size
        quality = view_quality(obj.box, obj.score, w, h)
        prev = self._best.get(obj.id)
        t = result.frame.captured_at
        if prev is not None and (quality <= prev[0] or t - prev[1] < MIN_INTERVAL_S):
            return
        with self._lock:
            if prev is not None and prev[2].cancel():  # superseded before its turn: its frame is let go
                prev[3].clear()
                self._pending -= 1
            full = self._pending >= MAX_PENDING
            if not full:
                self._pending += 1
        if full:
            self.skipped += 1
            if prev is not None and prev[2].cancelled():
                del self._best[obj.id]  # its best view was cancelled and this one cannot be queued
            return
        held = [result.frame.image]  # converted when it was dispatched
        fut = self._pool.submit(_encode_held, held, list(obj.box))
        fut.add_done_callback(self._encoded)
        self._best[obj.id] = (quality, t, fut, held)
        obj.snapshot = True

    def _encoded(self, fut: Future[tuple[bytes, bytes]]) -> None:
        if not fut.cancelled():  # (a cancelled one was counted off when cancelled)
            with self._lock:
                self._pending -= 1

    def _finish(self, obj: TrackedObject) -> None:
        got = self._best.pop(obj.id, None)
        if got is None:
            return
        # the pool has one thread and runs in order: its encoding is done by the time this runs
        self._pool.submit(self._write, obj.stream, obj.id, obj.label, got[2])

    def _write(self, stream: str, event_id: str, label: str, fut: Future[tuple[bytes, bytes]]) -> None:
        try:
            crop, full = fut.result()
            folder = self.folder / stream
            folder.mkdir(parents=True, exist_ok=True)
            crop_path, frame_path = folder / f"{event_id}-crop.jpg", folder / f"{event_id}-frame.jpg"
            crop_path.write_bytes(crop)
            frame_path.write_bytes(full)
        except Exception as exc:
            for part in (self.folder / stream / f"{event_id}-crop.jpg", self.folder / stream / f"{event_id}-frame.jpg"):
                part.unlink(missing_ok=True)  # no half-written JPEG left behind
            if not self.disk.failed(exc, event_id):  # a full disk: said once, not per snapshot
                log.warning("snapshot of %s not kept: %s", event_id, exc)
            return
        self.disk.wrote()
        self.written += 1
        kept = self._kept.setdefault(stream, deque())
        kept.append((event_id, crop_path, frame_path))
        if self.store is not None:
            self.store.set_snapshot(event_id, str(crop_path), str(frame_path))
        if self.publisher is not None and self.mqtt and self.on_loop is not None:
            topic = self.publisher.topics.snapshot(stream, label)
            self.on_loop(self.publisher.publish, topic, crop, None, True)
        while len(kept) > self.max_per_stream:
            old_id, c, f = kept.popleft()
            c.unlink(missing_ok=True)
            f.unlink(missing_ok=True)
            if self.store is not None:
                self.store.set_snapshot(old_id, None, None)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
