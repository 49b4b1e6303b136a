"""Offline rendering with MuseTalk: a whole audio file to a lip-synced video with its sound.

Audio prompts are computed for the whole input once (as MuseTalk's own scripts do). The voiced
frames are cut into time segments of one batch each and dealt round-robin to the lipsync slots
(`submit(jobs, k)` sends segment k to slot k mod n), with a bounded number of segments in flight;
the results are blended and written in time order into one encoder. Each frame depends only on
its own audio window and avatar frame, so splitting changes nothing in the output: no seam,
whatever the number of slots, and memory stays bounded however long the input is.

Silent frames (below `silence_db`) away from speech skip the model and show the avatar's own
frame. The model renders every frame within a few frames of speech (its audio window reaches two
frames ahead, so the mouth opens before the sound, as upstream), and the switches between the
avatar's face and the generated one are cross-faded both ways over silent frames; `always` renders
every frame.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from .audio import SAMPLES_PER_FRAME, rms_db
from .avatar import Avatar
from .defaults import BATCH_SIZE
from .musetalk import BLUR_OFFLINE, WINDOW_LEFT, LipSyncJob, MuseTalk

CROSSFADE_FRAMES = 3

Submit = Callable[[list[LipSyncJob], int], "Future[list[np.ndarray]]"]


SPEECH_MARGIN = WINDOW_LEFT + CROSSFADE_FRAMES  # model frames each side of speech: window + fade


def model_frames(voiced: list[bool], margin: int = SPEECH_MARGIN, always: bool = False) -> list[bool]:
    """Which frames the model renders: every frame within `margin` frames of a voiced one (so the
    mouth opens before speech as MuseTalk's two-frame look-ahead window makes it, and the fades
    between the generated and the avatar's own face fall on silent frames), or all when `always`."""
    if always:
        return [True] * len(voiced)
    out = [False] * len(voiced)
    for i, v in enumerate(voiced):
        if v:
            for j in range(max(0, i - margin), min(len(voiced), i + margin + 1)):
                out[j] = True
    return out


class Crossfade:
    """Eases between the avatar's own frames and generated ones over a few frames, both ways: into a
    run of generated frames (from the avatar's frame at that position) and out of it after speech."""

    def __init__(self, frames: int = CROSSFADE_FRAMES) -> None:
        self.frames = frames
        self.last: np.ndarray | None = None  # the last generated frame
        self.since = frames  # idle frames since it
        self.run = 0  # generated frames in the current run
        self.fade_in = False  # the current run follows idle frames (not the very start)
        self.started = False

    def spoken(self, frame: np.ndarray, idle: np.ndarray | None = None) -> np.ndarray:
        """A generated frame; `idle` is the avatar's own frame at its position (for the fade in)."""
        if self.run == 0:
            self.fade_in = self.started and idle is not None
        self.started = True
        self.last, self.since = frame, 0
        self.run += 1
        if not self.fade_in or self.run > self.frames or idle is None:
            return frame
        a = self.run / (self.frames + 1)
        return (frame.astype(np.float32) * a + idle.astype(np.float32) * (1 - a)).round().astype(np.uint8)

    def idle(self, idle: np.ndarray) -> np.ndarray:
        self.started = True
        self.run = 0
        self.since += 1
        if self.last is None or self.since > self.frames:
            return idle
        a = self.since / (self.frames + 1)
        return (self.last.astype(np.float32) * (1 - a) + idle.astype(np.float32) * a).round().astype(np.uint8)


def local_submit(model: MuseTalk) -> Submit:
    """Run each segment at once on `model` in the calling thread (one slot, no executor)."""

    def submit(jobs: list[LipSyncJob], k: int) -> Future[list[np.ndarray]]:
        fut: Future[list[np.ndarray]] = Future()
        try:
            fut.set_result(model.generate_faces([j.latents for j in jobs], [j.prompt for j in jobs]))
        except Exception as exc:
            fut.set_exception(exc)
        return fut

    return submit


def render(model: MuseTalk, avatar: Avatar, samples: np.ndarray, sink: object, batch_size: int = BATCH_SIZE,
           silence_db: float = -50.0, progress: Callable[[int, int], None] | None = None,
           submit: Submit | None = None, in_flight: int = 2, always: bool = False) -> dict[str, int]:
    """Write len(samples)/640 frames (rounded up) to `sink`; returns counts of generated and idle frames.

    `model` computes the audio prompts and the avatar latents; `submit` runs the UNet + VAE
    segments (default: `model` itself, here). At most `in_flight` segments wait for their results.
    The model renders the frames around speech (`model_frames`), or every frame when `always`.
    """
    import torch

    submit = submit or local_submit(model)
    n = -(-len(samples) // SAMPLES_PER_FRAME)
    padded = np.zeros(n * SAMPLES_PER_FRAME, np.float32)
    padded[:len(samples)] = samples
    chunks = padded.reshape(n, SAMPLES_PER_FRAME)
    prompts = model.audio_prompts(samples)
    faces = model.prepare_faces(avatar, blur=BLUR_OFFLINE)  # upstream's whole-file blending: 5% blur
    spoken = model_frames([bool(rms_db(c) >= silence_db) for c in chunks], always=always)
    voiced = [i for i, v in enumerate(spoken) if v and i < len(prompts)]
    segments = [voiced[i:i + batch_size] for i in range(0, len(voiced), batch_size)]
    pending: deque[tuple[list[int], Future[list[np.ndarray]]]] = deque()
    next_segment = 0

    def fill() -> None:
        nonlocal next_segment
        while len(pending) < max(1, in_flight) and next_segment < len(segments):
            idx = segments[next_segment]
            jobs = [LipSyncJob(faces[i % len(faces)].latents, prompts[i]) for i in idx]
            pending.append((idx, submit(jobs, next_segment)))
            next_segment += 1

    fade = Crossfade()
    counts = {"frames": 0, "generated": 0, "idle": 0}
    ready: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        fill()
        for i in range(n):
            face = faces[i % len(faces)]
            if i in ready or (pending and pending[0][0][0] == i):
                if i not in ready:
                    idx, fut = pending.popleft()
                    ready.update(zip(idx, fut.result(), strict=True))
                    fill()
                frame = fade.spoken(MuseTalk.paste(face, ready.pop(i)), face.frame)
                counts["generated"] += 1
            else:
                frame = fade.idle(face.frame)
                counts["idle"] += 1
            sink.write(frame, chunks[i])  # type: ignore[attr-defined]
            counts["frames"] = i + 1
            if progress is not None:
                progress(i + 1, n)
    return counts
