"""Audio in: 16 kHz mono float32, cut into one 40 ms chunk per 25 fps video frame.

Inputs are a file or any FFmpeg URL (decoded and resampled with PyAV), or PCM pushed in chunks
(the MQTT input: signed 16-bit little-endian, mono, 16 kHz, any chunk length up to
`MAX_CHUNK_SECONDS`; raw, or framed with a 12-byte header `FGA1`, u32 sequence number, u32 sample
rate, all little-endian, so out-of-order, repeated and wrong-rate chunks are recognised). Every
video frame owns exactly `SAMPLES_PER_FRAME` samples, from generation to the sink, so audio and
video cannot drift apart.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640 samples = 40 ms
MAX_CHUNK_SECONDS = 2.0  # a pushed chunk longer than this is refused (the queue holds 10 s)
FRAMED = b"FGA1"  # magic of a framed chunk: FRAMED + u32 seq + u32 rate + s16le PCM
REJECT_REASONS = ("malformed", "oversized", "wrong_rate", "out_of_order")


class AudioError(Exception):
    """Audio that cannot be read or decoded; the message names the input. `reason`: for a refused
    pushed chunk, one of REJECT_REASONS."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


def load_audio(source: str | Path, rate: int = SAMPLE_RATE, timeout: float = 10.0) -> np.ndarray:
    """The whole input as mono float32 in [-1, 1] at `rate` (resampled whatever it was)."""
    return np.concatenate(list(iter_audio(source, rate, timeout)) or [np.zeros(0, np.float32)])


def iter_audio(source: str | Path, rate: int = SAMPLE_RATE, timeout: float = 10.0) -> Iterator[np.ndarray]:
    """Decode `source` progressively: blocks of mono float32 samples at `rate`."""
    import av

    from streams import redact_text

    name = redact_text(str(source))
    try:
        container = av.open(str(source), timeout=timeout)
    except (av.error.FFmpegError, OSError) as exc:
        raise AudioError(f"audio {name}: cannot open: {exc}") from exc
    try:
        if not container.streams.audio:
            raise AudioError(f"audio {name}: no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    yield out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
            for out in resampler.resample(None):
                yield out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
        except av.error.FFmpegError as exc:
            raise AudioError(f"audio {name}: decode error: {exc}") from exc
    finally:
        container.close()


class Resampler:
    """Mono blocks at `rate` (int16 or float) -> float32 blocks at `SAMPLE_RATE`, continuous across
    blocks (PyAV's resampler): for audio that arrives in pieces (speech as it is synthesised)."""

    def __init__(self, rate: int) -> None:
        import av

        self.rate = rate
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._pts = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        import av

        if not len(samples):
            return np.zeros(0, np.float32)
        s16 = samples.dtype == np.int16
        data = samples if s16 else samples.astype(np.float32, copy=False)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data).reshape(1, -1), format="s16" if s16 else "flt",
                                           layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self.rate, self._pts, Fraction(1, self.rate)
        self._pts += frame.samples
        return self._out(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        return self._out(self._resampler.resample(None))

    @staticmethod
    def _out(frames: list[Any]) -> np.ndarray:
        parts = [f.to_ndarray().reshape(-1).astype(np.float32, copy=False) for f in frames]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def pcm16_to_float(data: bytes) -> np.ndarray:
    """The MQTT audio format: s16le mono 16 kHz -> float32 samples."""
    if len(data) % 2:
        raise AudioError(f"PCM chunk of {len(data)} bytes: s16le needs an even number of bytes")
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0


def check_pcm16(data: bytes) -> None:
    """A pushed chunk's PCM: an even number of bytes, at most MAX_CHUNK_SECONDS (AudioError otherwise)."""
    if len(data) % 2:
        raise AudioError(f"PCM chunk of {len(data)} bytes: s16le needs an even number of bytes")
    if len(data) > MAX_CHUNK_SECONDS * SAMPLE_RATE * 2:
        raise AudioError(f"PCM chunk of {len(data)} bytes: longer than {MAX_CHUNK_SECONDS:g} s", "oversized")


class FrameChunker:
    """Turns blocks of any length into exact 40 ms chunks (one per video frame)."""

    def __init__(self, samples_per_frame: int = SAMPLES_PER_FRAME) -> None:
        self.n = samples_per_frame
        self._buf = np.zeros(0, np.float32)

    def push(self, block: np.ndarray) -> list[np.ndarray]:
        self._buf = np.concatenate([self._buf, block.astype(np.float32, copy=False)])
        k = len(self._buf) // self.n
        chunks = [self._buf[i * self.n:(i + 1) * self.n] for i in range(k)]
        self._buf = self._buf[k * self.n:]
        return chunks

    def flush(self) -> list[np.ndarray]:
        """The last partial chunk, padded with silence (so the output keeps all the input's audio)."""
        if not len(self._buf):
            return []
        out = np.zeros(self.n, np.float32)
        out[:len(self._buf)] = self._buf
        self._buf = np.zeros(0, np.float32)
        return [out]


SPURT_GAP_S = 0.6  # pushed audio silent (or absent) this long ends its spurt
FADE_CHUNKS = 1  # frames (40 ms each) a barge-in fades out over (a linear ramp: no click; heard within 200 ms)


@dataclass
class Spurt:
    """A run of voiced audio pushed from outside (PCM over MQTT, a microphone): its chunks are
    [first, end) in the queue's numbering (`PushAudio.pushed`); it ends when no voiced chunk has
    come for `SPURT_GAP_S` (or at a cut)."""

    first: int
    end: int
    last_voiced: float  # monotonic arrival of its newest voiced chunk


class PushAudio:
    """Audio pushed from outside (MQTT PCM chunks): a bounded, thread-safe queue of frame chunks.
    Outside audio (`push_pcm16`) is also cut into spurts (`spurt`): chunks at or above `silence_db`
    start one, and it ends after `SPURT_GAP_S` without them."""

    def __init__(self, max_seconds: float = 10.0, silence_db: float = -50.0) -> None:
        self._chunker = FrameChunker()
        # (chunk, monotonic arrival time, its number): the session measures audio-in to frame-out latency
        self._chunks: deque[tuple[np.ndarray, float, int]] = deque(maxlen=int(max_seconds * FPS))
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a chunk queued, a cut, the close (`wait`)
        self.dropped = 0
        self.rejected_by = dict.fromkeys(REJECT_REASONS, 0)  # refused chunks by reason: counted, the rest goes on
        self.gaps = 0  # framed chunks missing between two received ones (sequence numbers skipped)
        self._seq: int | None = None  # the last framed chunk's sequence number
        self.closed = False
        self.last_arrival: float | None = None  # arrival time of the chunk `pop` returned last
        self.last_number = -1  # and its number (chunks are numbered from 0 as they are queued)
        self.cuts = 0  # barge-ins so far; the last one cut every chunk numbered below `cut_mark`
        self.cut_mark = 0
        self.cut_at = 0.0  # monotonic time of the last cut (its delay to the writer is in the session's stats)
        self.cut_fade = 0  # chunks the last cut kept, faded out
        self.pushed = 0  # chunks ever queued: chunk k (from 0) has been taken (spoken, dropped, cut) once `taken` > k
        self.silence_db = silence_db
        self.spurt: Spurt | None = None  # the newest spurt of outside audio (None after a cut)

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by.values())

    def push_payload(self, data: bytes) -> None:
        """One MQTT audio message, raw or framed. Raises AudioError (with its `reason`, counted) for a
        chunk that is refused; nothing else changes."""
        try:
            if data[:4] == FRAMED:
                data = self._unframe(data)
            self.push_pcm16(data)
        except AudioError as exc:
            with self._lock:
                self.rejected_by[exc.reason] += 1
            raise

    def _unframe(self, data: bytes) -> bytes:
        if len(data) < 12:
            raise AudioError(f"framed chunk of {len(data)} bytes: shorter than its 12-byte header")
        seq, rate = int.from_bytes(data[4:8], "little"), int.from_bytes(data[8:12], "little")
        if rate != SAMPLE_RATE:
            raise AudioError(f"chunk {seq} at {rate} Hz: send {SAMPLE_RATE} Hz mono s16le", "wrong_rate")
        check_pcm16(data[12:])  # a refused body does not advance the sequence
        with self._lock:
            if self._seq is not None and seq <= self._seq:
                raise AudioError(f"chunk {seq} after chunk {self._seq}: late or repeated", "out_of_order")
            if self._seq is not None:
                self.gaps += seq - self._seq - 1
            self._seq = seq
        return data[12:]

    def push_pcm16(self, data: bytes) -> None:
        """Outside audio: queued, and its voiced chunks counted into spurts."""
        check_pcm16(data)
        self.push_samples(pcm16_to_float(data), spurts=True)

    @property
    def queued_s(self) -> float:
        """Seconds of audio waiting to be spoken."""
        return len(self._chunks) / FPS

    @property
    def taken(self) -> int:
        """Chunks no longer waiting: popped by the session, dropped on overflow or cut."""
        with self._lock:
            return self.pushed - len(self._chunks)

    def push_samples(self, samples: np.ndarray, end: bool = False, spurts: bool = False) -> None:
        """float32 16 kHz mono samples (speech synthesised here, say); `end`: the utterance ends here,
        its last partial chunk goes out padded with silence; `spurts`: count voiced chunks into spurts."""
        now = time.monotonic()
        with self._lock:
            for c in [*self._chunker.push(samples), *(self._chunker.flush() if end else [])]:
                if len(self._chunks) == self._chunks.maxlen:
                    self.dropped += 1
                self._chunks.append((c, now, self.pushed))
                self.pushed += 1
                if spurts and rms_db(c) >= self.silence_db:
                    if self.spurt is None or now - self.spurt.last_voiced > SPURT_GAP_S:
                        self.spurt = Spurt(self.pushed - 1, self.pushed, now)
                    self.spurt.end, self.spurt.last_voiced = self.pushed, now
            self._changed.notify_all()

    def cut(self, fade_chunks: int = FADE_CHUNKS) -> int:
        """Barge-in: all that waits is dropped but its first `fade_chunks`, faded out to silence (so the
        voice and the mouth close within them, no click) -> chunks dropped. A session that already
        took chunks it has not rendered (a block backend's block and lookahead) sees `cuts` change:
        it fades and drops those instead, and these with them (`drop_before(cut_mark)`)."""
        with self._lock:
            kept = [self._chunks.popleft() for _ in range(min(fade_chunks, len(self._chunks)))]
            dropped = len(self._chunks)
            self._chunks.clear()
            self._chunker.flush()  # a partial chunk is dropped too
            self.spurt = None  # what is pushed after a cut is a new spurt
            faded = fade_out([c for c, _, _ in kept])
            self._chunks.extend((f, at, n) for f, (_, at, n) in zip(faded, kept, strict=True))
            self.cuts += 1
            self.cut_mark, self.cut_fade, self.cut_at = self.pushed, fade_chunks, time.monotonic()
            self._changed.notify_all()
            return dropped

    def drop_before(self, number: int) -> int:
        """Drop the waiting chunks numbered below `number` -> how many."""
        with self._lock:
            before = len(self._chunks)
            self._chunks = deque((e for e in self._chunks if e[2] >= number), maxlen=self._chunks.maxlen)
            return before - len(self._chunks)

    def close(self) -> None:
        now = time.monotonic()
        with self._lock:
            for c in self._chunker.flush():
                self._chunks.append((c, now, self.pushed))
                self.pushed += 1
            self.closed = True
            self._changed.notify_all()

    def wait(self, timeout: float) -> None:
        """Wait up to `timeout` s for a chunk to pop (or a cut, the close, `wake`)."""
        with self._changed:
            if not self._chunks and not self.closed and timeout > 0:
                self._changed.wait(timeout)

    def wake(self) -> None:
        """End a `wait` now (the session is stopping)."""
        with self._changed:
            self._changed.notify_all()

    def pop(self) -> np.ndarray | None:
        with self._lock:
            if not self._chunks:
                return None
            chunk, self.last_arrival, self.last_number = self._chunks.popleft()
            return chunk


def fade_out(chunks: list[np.ndarray]) -> list[np.ndarray]:
    """`chunks` (one frame each) faded linearly to silence over their length (a cut without a click)."""
    ramp = np.linspace(1.0, 0.0, max(1, len(chunks)) * SAMPLES_PER_FRAME, dtype=np.float32)
    return [c * ramp[i * SAMPLES_PER_FRAME:(i + 1) * SAMPLES_PER_FRAME] for i, c in enumerate(chunks)]


def rms_db(chunk: np.ndarray) -> float:
    """Loudness of a chunk in dBFS (-120 for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(chunk, dtype=np.float64)))) if len(chunk) else 0.0
    return 20 * np.log10(max(rms, 1e-6))
