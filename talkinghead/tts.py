"""Text to speech, offline: Debian's `espeak-ng`, streamed as it synthesises.

`Speech.stream(text)` runs `espeak-ng --stdout` with the text on its stdin and yields the audio as
float32 16 kHz mono blocks (framegrid's session rate) while espeak-ng is still writing, so a live
session can start speaking before the whole text is synthesised. espeak-ng writes a WAV stream
(22.05 kHz mono s16le, its header's sizes left open); each block is resampled with PyAV.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np

from .audio import SAMPLE_RATE

BLOCK_BYTES = 2 * 2205  # 100 ms of espeak-ng's 22.05 kHz mono s16le: the first block comes this soon
MAX_TEXT = 5000  # characters per utterance


class TtsError(Exception):
    """Text that cannot be spoken, or no engine to speak it (the message says which and what to do)."""


class Speech:
    """One engine's settings (`[tts]`): `voice` (espeak-ng's voice name, e.g. `en`, `en-us`, `de`),
    `speed` (words per minute)."""

    def __init__(self, voice: str, speed: int, binary: str = "espeak-ng") -> None:
        self.voice, self.speed, self.binary = voice, speed, binary

    def stream(self, text: str, voice: str | None = None) -> Iterator[np.ndarray]:
        """The speech of `text` in 16 kHz float32 mono blocks, as it is synthesised."""
        import av

        text = text.strip()
        if not text:
            raise TtsError("text is empty")
        if len(text) > MAX_TEXT:
            raise TtsError(f"text of {len(text)} characters: at most {MAX_TEXT} per utterance")
        exe = shutil.which(self.binary)
        if exe is None:
            raise TtsError(f"{self.binary} not found: install it (Debian/Ubuntu: apt install espeak-ng)")
        voice = voice or self.voice
        proc = subprocess.Popen([exe, "--stdout", "-v", voice, "-s", str(self.speed)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            proc.stdin.write(text.encode("utf-8"))
            proc.stdin.close()
            header = _read(proc.stdout, 44)
            if len(header) < 44 or header[:4] != b"RIFF":
                proc.wait(5)
                err = (proc.stderr.read() if proc.stderr else b"").decode("utf-8", "replace").strip()
                raise TtsError(f"{self.binary} gave no speech for voice {voice!r}: {err or 'no output'}")
            rate = int.from_bytes(header[24:28], "little")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            pts = 0
            while True:
                data = _read(proc.stdout, BLOCK_BYTES)
                data = data[: len(data) // 2 * 2]
                frame: Any = None
                if data:
                    frame = av.AudioFrame.from_ndarray(np.frombuffer(data, "<i2").reshape(1, -1), format="s16",
                                                       layout="mono")
                    frame.sample_rate, frame.pts, frame.time_base = rate, pts, Fraction(1, rate)
                    pts += frame.samples
                out = [f.to_ndarray().reshape(-1).astype(np.float32) for f in resampler.resample(frame)]
                if out:
                    yield np.concatenate(out)
                if frame is None:  # the end (the resampler flushed)
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
            if proc.stderr is not None:
                proc.stderr.close()


def _read(pipe: Any, n: int) -> bytes:
    """Up to `n` bytes (fewer only at the end of the stream)."""
    parts, got = [], 0
    while got < n:
        chunk = pipe.read1(n - got) if hasattr(pipe, "read1") else pipe.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
