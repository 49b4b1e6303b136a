"""Offline rendering with MuseTalk: a whole audio file to a lip-synced video with its sound.

Audio prompts are computed for the whole input once (as MuseTalk's own scripts do), frames are
generated in batches on the model, and each frame is written with its own 40 ms of audio. Silent
frames (below `silence_db`) skip the UNet and show the avatar's own frame, cross-faded over a few
frames so the mouth does not snap shut.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .audio import SAMPLES_PER_FRAME, rms_db
from .avatar import Avatar
from .musetalk import MuseTalk, ping_pong

CROSSFADE_FRAMES = 3


def render(model: MuseTalk, avatar: Avatar, samples: np.ndarray, sink: object, batch_size: int = 8,
           silence_db: float = -50.0, progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Write len(samples)/640 frames (rounded up) to `sink`; returns counts of generated and idle frames."""
    n = -(-len(samples) // SAMPLES_PER_FRAME)
    padded = np.zeros(n * SAMPLES_PER_FRAME, np.float32)
    padded[:len(samples)] = samples
    chunks = padded.reshape(n, SAMPLES_PER_FRAME)
    prompts = model.audio_prompts(samples)
    faces = ping_pong([model.prepare_face(avatar.image, avatar.box)])
    silent = [rms_db(c) < silence_db or i >= len(prompts) for i, c in enumerate(chunks)]
    counts = {"frames": 0, "generated": 0, "idle": 0}
    last: np.ndarray | None = None
    since_voice = CROSSFADE_FRAMES
    i = 0
    while i < n:
        if silent[i]:
            idle = faces[i % len(faces)].frame
            since_voice += 1
            if last is not None and since_voice <= CROSSFADE_FRAMES:  # ease from the last spoken frame
                a = since_voice / (CROSSFADE_FRAMES + 1)
                frame = (last.astype(np.float32) * (1 - a) + idle.astype(np.float32) * a).round().astype(np.uint8)
            else:
                frame = idle
            sink.write(frame, chunks[i])  # type: ignore[attr-defined]
            counts["idle"] += 1
            i += 1
        else:
            j = i
            while j < n and j - i < batch_size and not silent[j]:
                j += 1
            frames = model.generate([faces[k % len(faces)] for k in range(i, j)], prompts[i:j])
            for k, frame in zip(range(i, j), frames, strict=True):
                sink.write(frame, chunks[k])  # type: ignore[attr-defined]
            last, since_voice = frames[-1], 0
            counts["generated"] += j - i
            i = j
        counts["frames"] = i
        if progress is not None:
            progress(i, n)
    return counts
