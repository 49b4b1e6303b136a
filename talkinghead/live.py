"""Live MuseTalk: a block backend for `TalkSession` whose model work runs on lipsync executor slots.

Per block of frames, on the session's thread: the audio prompts come from the Whisper encoder
over the session's audio since the start of its current 30 s segment, the block, and `lookahead`
frames after it. That is the offline path's own split (whole-file audio in 30 s segments from
the start), so every frame's features sit at the same positions in the same segment as offline
and differ only in the audio after the lookahead that live cannot know yet; with a sliding
history instead, Whisper's position embeddings put each frame elsewhere and the prompts drift far
from offline's. The lookahead (default 200 ms: the model's own window reaches two frames ahead)
is what live adds to latency. The log-mel is computed for the heard audio only
(`MuseTalk.log_mel`), not for 30 s of padding per block.

The frames around speech go to the session's slot as one request (`submit(jobs) -> Future`),
where they are batched with other sessions' frames; the returned faces are pasted back through
the mask here, off the inference thread. Frames away from speech skip the model and show the
avatar's own (ping-pong) frames; the switches are cross-faded both ways, as offline.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from .audio import SAMPLE_RATE, SAMPLES_PER_FRAME
from .musetalk import WINDOW_LEFT, WINDOW_RIGHT, AudioWindow, LipSyncJob, MuseTalk, PreparedFace
from .offline import SPEECH_MARGIN, Crossfade, model_frames

LOOKAHEAD_FRAMES = 5  # 200 ms after the block: Whisper context (and the model's own 2-frame window)
SEGMENT_SAMPLES = 30 * SAMPLE_RATE  # Whisper's window: the offline path's segments


class MuseTalkLive:
    """One session's MuseTalk backend. `frontend` is a MuseTalk loaded with the VAE and Whisper
    (avatar latents, audio prompts); the UNet and the VAE decode run behind `submit`. A block whose
    frames are not back within `timeout` seconds counts as failed (the session shows its last
    frame and goes on), so a stuck slot cannot freeze a live stream."""

    name = "musetalk"

    def __init__(self, frontend: MuseTalk, faces: list[PreparedFace],
                 submit: Callable[[list[LipSyncJob]], Future[list[np.ndarray]]], block: int,
                 timeout: float, lookahead: int = LOOKAHEAD_FRAMES, always: bool = False,
                 whisper_on_slot: bool = False) -> None:
        """`block` frames per request and `timeout` per block: the session's settings (`[lipsync]`);
        `lookahead` frames of audio after the block (at least the model's window, 2); `always`
        renders every frame with the model, silent or not; `whisper_on_slot`: the jobs carry the
        block's audio window and the slot computes the prompts (one Whisper pass per block)."""
        if not faces:
            raise ValueError("a MuseTalk session needs at least one prepared avatar frame")
        self.frontend = frontend
        self.faces = faces
        self.submit = submit
        self.block = block
        self.timeout = timeout
        self.lookahead = max(WINDOW_RIGHT, lookahead)
        self.always = always
        self.whisper_on_slot = whisper_on_slot
        self.heard = np.zeros(0, np.float32)  # the audio since the current 30 s segment began
        self.recent: list[bool] = []  # the voicing of the last SPEECH_MARGIN frames rendered
        self.index = 0  # frames rendered so far: position in the avatar's ping-pong loop
        self.fade = Crossfade()
        self.generated = 0  # frames the model rendered in the last block
        self.stage_ms: dict[str, float] = {}

    def idle_frame(self) -> np.ndarray:
        return self.faces[self.index % len(self.faces)].frame

    def hear(self, block_audio: np.ndarray) -> None:
        """The block has been rendered: its audio joins the segment (and a new segment begins every 30 s).

        The finished segment is kept until the new one holds `WINDOW_LEFT` frames: the windows of
        the new segment's first frames reach back into the old one's last features, as offline's do
        (the whole-file features are the segments' features end to end). Cut at once, those frames
        saw zeros there (cosine 0.78 and 0.89 to offline's prompts for blocks that start on the cut).
        """
        self.heard = np.concatenate([self.heard, block_audio])
        if len(self.heard) >= SEGMENT_SAMPLES + WINDOW_LEFT * SAMPLES_PER_FRAME:  # cuts fall on frames
            self.heard = self.heard[SEGMENT_SAMPLES:]

    def block_prompts(self, block_audio: np.ndarray, ahead: list[np.ndarray]) -> Any:
        """The audio prompts of the block's frames: features over the current segment so far, the
        block and the lookahead (see the module's description)."""
        offset = len(self.heard) // SAMPLES_PER_FRAME
        prompts: Any = self.frontend.audio_prompts(self.block_window(block_audio, ahead))
        return prompts[offset:offset + len(block_audio) // SAMPLES_PER_FRAME]

    def block_window(self, block_audio: np.ndarray, ahead: list[np.ndarray]) -> np.ndarray:
        """The audio the block's features see: the segment so far, the block, the lookahead."""
        return np.concatenate([self.heard, block_audio, *ahead]).astype(np.float32)

    def render_block(self, chunks: list[np.ndarray], voiced: list[bool], ahead: list[np.ndarray]
                     ) -> list[np.ndarray]:
        """`voiced` covers `chunks` then `ahead`."""
        import time

        n = len(chunks)
        faces = [self.faces[(self.index + k) % len(self.faces)] for k in range(n)]
        block_audio = np.concatenate(chunks).astype(np.float32)
        past = len(self.recent)
        run = model_frames(self.recent + list(voiced), SPEECH_MARGIN, self.always)[past:past + n]
        generated: dict[int, np.ndarray] = {}
        idx = [k for k in range(n) if run[k]]
        if idx:
            t0 = time.perf_counter()
            if self.whisper_on_slot:
                window = self.block_window(block_audio, ahead)
                offset = len(self.heard) // SAMPLES_PER_FRAME
                jobs = [LipSyncJob(faces[k].latents, None, AudioWindow(window, offset + k)) for k in idx]
            else:
                prompts = self.block_prompts(block_audio, ahead)
                jobs = [LipSyncJob(faces[k].latents, prompts[k]) for k in idx]
            t1 = time.perf_counter()
            outs = self.submit(jobs).result(self.timeout)
            t2 = time.perf_counter()
            generated = dict(zip(idx, outs, strict=True))
            self.stage_ms = {"features": (t1 - t0) * 1000 / len(idx), "model": (t2 - t1) * 1000 / len(idx)}
        frames = []
        for k in range(n):
            if k in generated:
                frames.append(self.fade.spoken(MuseTalk.paste(faces[k], generated[k]), faces[k].frame))
            else:
                frames.append(self.fade.idle(faces[k].frame))
        self.generated = len(generated)
        self.advance(block_audio, voiced[:n])
        return frames

    def skip(self, chunks: list[np.ndarray], voiced: list[bool]) -> None:
        """Chunks the session could not render in time (it repeats its last frame for them): their
        audio still joins the segment and the avatar still moves on, so the blocks after them get the
        prompts and avatar frames of their own place in time (as offline would give them)."""
        self.generated = 0
        self.advance(np.concatenate(chunks).astype(np.float32), voiced[:len(chunks)])

    def advance(self, block_audio: np.ndarray, voiced: list[bool]) -> None:
        self.hear(block_audio)
        self.recent = (self.recent + list(voiced))[-SPEECH_MARGIN:]
        self.index += len(voiced)
