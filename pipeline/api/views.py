"""Live views: the newest processed frame of each stream, as JPEG, with its detections drawn.

`LatestResults` is a `ResultSink`: it keeps a reference to each stream's newest `Result` (its
frame was converted to BGR when it was dispatched, so nothing is decoded or converted again).
JPEGs are encoded on demand, off the loop, once per (result, boxes) however many viewers ask.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pipeline.errors import Invalid, Unavailable
from streams import StreamError

if TYPE_CHECKING:
    from pipeline.core.ingest import StreamRecord
    from pipeline.core.results import Result

JPEG_QUALITY = 80
MAX_VIEW_SIDE = 1280  # live views are scaled down to this (a 4K camera is not sent at 4K to a browser)


def _colour(class_id: int) -> tuple[int, int, int]:
    hue = (class_id * 47) % 180
    bgr = cv2.cvtColor(np.array([[[hue, 200, 255]]], np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def render_jpeg(result: Result, boxes: bool) -> bytes:
    """The result's frame (scaled to at most MAX_VIEW_SIDE) as JPEG, with its boxes when asked."""
    image = result.frame.image
    h, w = image.shape[:2]
    scale = min(1.0, MAX_VIEW_SIDE / max(h, w))
    out = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) if scale < 1 \
        else image.copy()
    if boxes:
        det = result.detections
        thick = max(1, round(max(out.shape[:2]) / 400))
        for (x1, y1, x2, y2), label, conf, cid in zip(det.boxes * scale, det.labels, det.confidences,
                                                      det.class_ids, strict=True):
            colour = _colour(int(cid))
            p1, p2 = (round(float(x1)), round(float(y1))), (round(float(x2)), round(float(y2)))
            cv2.rectangle(out, p1, p2, colour, thick)
            text = f"{label} {float(conf):.2f}"
            (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, thick)
            top = max(0, p1[1] - th - base - 2)
            cv2.rectangle(out, (p1[0], top), (p1[0] + tw + 2, top + th + base + 2), colour, -1)
            cv2.putText(out, text, (p1[0] + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, (0, 0, 0),
                        thick, cv2.LINE_AA)
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def no_main(stream: str) -> Invalid:
    return Invalid(f"stream {stream} has one URL: its snapshot is the frame it detects on (main= needs detect_url)",
                   [("main", "the stream has no detect_url")])


async def main_jpeg(record: StreamRecord) -> tuple[int, bytes]:
    """(keyframes grabbed or 0, JPEG) of the camera's main stream: its newest keyframe, decoded now at
    full resolution (the only time a main stream is decoded). Invalid without `detect_url`,
    Unavailable when the main stream gives no keyframe."""
    main = record.main
    if main is None:
        raise no_main(record.name)
    try:
        picture = await asyncio.to_thread(main.picture)
    except StreamError as exc:
        raise Unavailable(f"stream {record.name}: main stream: {exc}") from None
    ok, buf = await asyncio.to_thread(cv2.imencode, ".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return main.grabs, buf.tobytes()


class LatestResults:
    """The newest result per stream (a ResultSink) and their JPEGs, encoded once each."""

    def __init__(self) -> None:
        self.results: dict[str, Result] = {}
        self._jpegs: dict[tuple[str, bool], tuple[int, bytes]] = {}  # (stream, boxes) -> (seq, jpeg)
        # (stream, boxes) -> (seq, its encode under way): viewers asking for the same frame at once share
        # one encode (20 MJPEG viewers of a stream otherwise encoded each new frame up to 20 times)
        self._encoding: dict[tuple[str, bool], tuple[int, asyncio.Future[bytes]]] = {}

    def emit(self, result: Result) -> None:
        self.results[result.stream.name] = result

    def forget(self, stream: str) -> None:
        self.results.pop(stream, None)
        for boxes in (False, True):
            self._jpegs.pop((stream, boxes), None)
            self._encoding.pop((stream, boxes), None)

    def objects(self, stream: str) -> dict[str, int]:
        r = self.results.get(stream)
        if r is None:
            return {}
        counts: dict[str, int] = {}
        for label in r.detections.labels:
            counts[label] = counts.get(label, 0) + 1
        return counts

    def seq(self, stream: str) -> int | None:
        r = self.results.get(stream)
        return r.seq if r is not None else None

    async def jpeg(self, stream: str, boxes: bool) -> tuple[int, bytes] | None:
        """(seq, JPEG) of the stream's newest result; None before its first."""
        result = self.results.get(stream)
        if result is None:
            return None
        key = (stream, boxes)
        cached = self._jpegs.get(key)
        if cached is not None and cached[0] == result.seq:
            return cached
        running = self._encoding.get(key)
        if running is None or running[0] != result.seq:
            running = (result.seq, asyncio.ensure_future(asyncio.to_thread(render_jpeg, result, boxes)))
            self._encoding[key] = running
        data = await asyncio.shield(running[1])  # a viewer that leaves does not cancel the others' encode
        if self._encoding.get(key) is running:
            del self._encoding[key]
            self._jpegs[key] = (result.seq, data)
        return result.seq, data
