"""The decoded frame that crosses from a decode thread to the batcher (through its mailbox).

A frame holds the decoder's picture as it came out (YUV, in FFmpeg's buffers), not a converted
copy: most frames of a camera are overwritten in their mailbox before any slot wants them, and
converting those would be wasted work. A frame that is dispatched converts itself to BGR once,
on the slot's thread, when the detector letterboxes it (see `detectors.base.Picture`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np


class VideoPicture:
    """A decoded `av.VideoFrame` that converts itself to BGR uint8 at most once, on demand.

    The conversion is FFmpeg's (the same as `VideoFrame.to_ndarray(format="bgr24")`, so a
    reference that decodes the same stream sees the same pixels) on one thread: the caller is a
    slot's worker, and the other core is decoding. `convert_ms` says what it cost.
    """

    __slots__ = ("_bgr", "_frame", "_lock", "convert_ms", "height", "width")

    def __init__(self, frame: Any) -> None:
        self._frame = frame
        self._bgr: np.ndarray | None = None
        self._lock = threading.Lock()
        self.width = int(frame.width)
        self.height = int(frame.height)
        self.convert_ms: float | None = None

    def bgr(self) -> np.ndarray:
        with self._lock:
            if self._bgr is None:
                t0 = time.perf_counter()
                self._bgr = self._frame.to_ndarray(format="bgr24", threads=1)
                self._frame = None  # the decoder's buffer goes back to its pool
                self.convert_ms = (time.perf_counter() - t0) * 1000
            return self._bgr

    @property
    def converted(self) -> bool:
        return self._bgr is not None


def _check_array(stream: str, img: Any) -> None:
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        shape = getattr(img, "shape", None)
        raise ValueError(f"stream {stream}: frame must be HxWx3 uint8, got {shape}")


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded video frame with its timing.

    `picture` is a `VideoPicture` (from a decoder) or a BGR uint8 HxWx3 array (synthetic sources,
    tests); `image` is its BGR pixels (converting a `VideoPicture` on first use). `captured_at`
    is wall-clock (unix seconds) when the decoder produced the frame: the start of framegrid's
    latency budget. `pts` is the presentation time in seconds on the stream's own clock
    (continuous across loops of a file source), `index` counts frames decoded by this source
    since start, and `decode_ms` is the time spent decoding it.
    """

    stream: str
    index: int
    picture: VideoPicture | np.ndarray
    captured_at: float
    pts: float | None
    decode_ms: float
    captured_mono: float = 0.0  # time.monotonic() at capture, for ages immune to clock steps

    def __post_init__(self) -> None:
        if not isinstance(self.picture, VideoPicture):
            _check_array(self.stream, self.picture)

    @property
    def image(self) -> np.ndarray:
        """BGR uint8 HxWx3 pixels of the picture."""
        pic = self.picture
        return pic.bgr() if isinstance(pic, VideoPicture) else pic

    @property
    def width(self) -> int:
        """Width of the picture (boxes are published in these coordinates)."""
        pic = self.picture
        return pic.width if isinstance(pic, VideoPicture) else int(pic.shape[1])

    @property
    def height(self) -> int:
        pic = self.picture
        return pic.height if isinstance(pic, VideoPicture) else int(pic.shape[0])
