"""The decoded frame that crosses from a decode thread to the scheduler."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded video frame, BGR uint8 HxWx3, with its timing.

    `captured_at` is wall-clock (unix seconds) when the decoder produced the frame: the start of
    framegrid's latency budget. `pts` is the presentation time in seconds on the stream's own
    clock (continuous across loops of a file source), `index` counts frames decoded by this
    source since start, and `decode_ms` is the time spent decoding and converting it.
    """

    stream: str
    index: int
    image: np.ndarray
    captured_at: float
    pts: float | None
    decode_ms: float
    captured_mono: float = 0.0  # time.monotonic() at capture, for ages immune to clock steps

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            shape = getattr(img, "shape", None)
            raise ValueError(f"stream {self.stream}: frame must be HxWx3 uint8, got {shape}")

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])
