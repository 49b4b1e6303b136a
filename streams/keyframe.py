"""A camera's keyframe kept as its packet and decoded only when asked.

A camera's main stream (1080p or more) is never decoded when its substream is detected on: it is
recorded by packet copy, or not read at all. Its full-resolution picture is still wanted now and
then (a snapshot): `Keyframe` holds one keyframe's packet with what a fresh decoder needs (codec,
extradata), and `picture()` decodes it on its own, on the caller's thread. `source.grab_keyframe`
opens a stream, reads up to its first keyframe and closes it (the main stream of a camera that is
not recorded: a connection per snapshot, not a reader per camera).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from .errors import StreamError


@dataclass(frozen=True, slots=True)
class Keyframe:
    codec: str
    extradata: bytes | None
    data: bytes
    size: tuple[int, int] | None  # the stream's (width, height) as opened
    wall: float  # when it was read (wall clock)

    @classmethod
    def of(cls, vstream: Any, packet: Any, wall: float) -> Keyframe:
        ctx = vstream.codec_context
        size = (int(ctx.width), int(ctx.height)) if ctx.width and ctx.height else None
        return cls(ctx.name, bytes(ctx.extradata) if ctx.extradata else None, bytes(packet), size, wall)

    def picture(self) -> np.ndarray:
        """The keyframe decoded (BGR, its own size). Raises StreamError when it does not decode."""
        ctx: Any = av.CodecContext.create(self.codec, "r")  # a video decoder (the stubs type it as the base)
        if self.extradata:
            ctx.extradata = self.extradata
        try:
            frames = [*ctx.decode(av.Packet(self.data)), *ctx.decode(None)]
        except av.error.FFmpegError as exc:
            raise StreamError(f"the {self.codec} keyframe does not decode: {exc}") from exc
        if not frames:
            raise StreamError(f"the {self.codec} keyframe gave no picture")
        return np.asarray(frames[0].to_ndarray(format="bgr24"))
