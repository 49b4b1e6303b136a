"""Live MuseTalk: a block backend for `TalkSession` whose model work runs on lipsync executor slots.

Per block of frames, on the session's thread: the audio prompts come from the Whisper encoder
over the block with `context` seconds of history before it and the lookahead after it (MuseTalk's
window reaches two frames ahead); the voiced frames go to the session's slot as one request
(`submit(jobs) -> Future`), where they are batched with other sessions' frames; the returned
faces are pasted back through the mask here, off the inference thread. Silent frames skip the
model and show the avatar's own (ping-pong) frames, cross-faded after speech.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from .audio import SAMPLES_PER_FRAME
from .musetalk import WINDOW_RIGHT, LipSyncJob, MuseTalk, PreparedFace
from .offline import Crossfade


class MuseTalkLive:
    """One session's MuseTalk backend. `frontend` is a MuseTalk loaded with the VAE and Whisper
    (avatar latents, audio prompts); the UNet and the VAE decode run behind `submit`. A block whose
    frames are not back within `timeout` seconds counts as failed (the session shows its last
    frame and goes on), so a stuck slot cannot freeze a live stream."""

    name = "musetalk"
    lookahead = WINDOW_RIGHT

    def __init__(self, frontend: MuseTalk, faces: list[PreparedFace],
                 submit: Callable[[list[LipSyncJob]], Future[list[np.ndarray]]], block: int,
                 timeout: float, context: float = 1.0) -> None:
        """`block` frames per request and `timeout` per block: the session's settings (`[lipsync]`)."""
        if not faces:
            raise ValueError("a MuseTalk session needs at least one prepared avatar frame")
        self.frontend = frontend
        self.faces = faces
        self.submit = submit
        self.block = block
        self.timeout = timeout
        self.context_samples = int(context * 25) * SAMPLES_PER_FRAME
        self.history = np.zeros(0, np.float32)
        self.index = 0  # frames rendered so far: position in the avatar's ping-pong loop
        self.fade = Crossfade()
        self.stage_ms: dict[str, float] = {}

    def idle_frame(self) -> np.ndarray:
        return self.faces[self.index % len(self.faces)].frame

    def render_block(self, chunks: list[np.ndarray], voiced: list[bool], ahead: list[np.ndarray]
                     ) -> list[np.ndarray]:
        import time

        n = len(chunks)
        faces = [self.faces[(self.index + k) % len(self.faces)] for k in range(n)]
        block_audio = np.concatenate(chunks).astype(np.float32)
        generated: dict[int, np.ndarray] = {}
        if any(voiced):
            t0 = time.perf_counter()
            offset = len(self.history) // SAMPLES_PER_FRAME
            window = np.concatenate([self.history, block_audio, *ahead]).astype(np.float32)
            prompts: Any = self.frontend.audio_prompts(window)
            t1 = time.perf_counter()
            idx = [k for k in range(n) if voiced[k]]
            jobs = [LipSyncJob(faces[k].latents, prompts[offset + k]) for k in idx]
            outs = self.submit(jobs).result(self.timeout)
            t2 = time.perf_counter()
            generated = dict(zip(idx, outs, strict=True))
            self.stage_ms = {"features": (t1 - t0) * 1000 / len(idx), "model": (t2 - t1) * 1000 / len(idx)}
        frames = []
        for k in range(n):
            if k in generated:
                frames.append(self.fade.spoken(MuseTalk.paste(faces[k], generated[k])))
            else:
                frames.append(self.fade.idle(faces[k].frame))
        self.history = np.concatenate([self.history, block_audio])[-self.context_samples:]
        self.index += n
        return frames
