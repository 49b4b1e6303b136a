"""The decoded frame that crosses from a decode thread to the batcher (through its mailbox)."""

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
    source_size: tuple[int, int] | None = None  # (w, h) as decoded, when the decoder scaled the image down

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            shape = getattr(img, "shape", None)
            raise ValueError(f"stream {self.stream}: frame must be HxWx3 uint8, got {shape}")

    @property
    def width(self) -> int:
        """Width of the source picture (boxes are published in these coordinates)."""
        return self.source_size[0] if self.source_size else int(self.image.shape[1])

    @property
    def height(self) -> int:
        return self.source_size[1] if self.source_size else int(self.image.shape[0])

    @property
    def scale(self) -> tuple[float, float]:
        """Source pixels per image pixel (x, y): 1.0 unless the decoder scaled the picture down."""
        return self.width / self.image.shape[1], self.height / self.image.shape[0]


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) scaled to fit inside max_side x max_side, keeping the aspect ratio; never upscaled.

    The rounding is the letterbox's, so a model of input size `max_side` has nothing left to resize.
    """
    if max(width, height) <= max_side:
        return width, height
    gain = min(max_side / width, max_side / height)
    return max(round(width * gain), 1), max(round(height * gain), 1)
