"""A talking-head session: avatar + audio input + sink, one video frame per 40 ms of audio.

Each 40 ms audio chunk becomes exactly one video frame, and the two travel together to the sink,
so lip sync cannot drift. In real time, frame i is due at start + i/25 s; when generation falls
behind, the session repeats its last frame for the late chunks (visible, counted, and reported
as `degraded`) and keeps the audio whole. Silence (a chunk below `silence_db`) skips the model
and shows the avatar's own frame; the mouth's release smoothing makes that a short cross-fade.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .audio import FPS, FrameChunker, PushAudio, rms_db

log = logging.getLogger(__name__)


class LipSyncBackend(Protocol):
    name: str

    def openness(self, chunk: np.ndarray) -> float: ...

    def render(self, openness: float) -> np.ndarray: ...


class Sink(Protocol):
    def write(self, frame: np.ndarray, audio: np.ndarray) -> None: ...

    def close(self) -> None: ...


@dataclass
class SessionStats:
    frames: int = 0  # frames written (= 40 ms audio chunks)
    inferred: int = 0  # frames the backend generated
    idle: int = 0  # silent chunks: the avatar's own frame
    late: int = 0  # chunks whose frame was repeated because generation fell behind
    render_ms: list[float] = field(default_factory=list)

    def snapshot(self, elapsed: float) -> dict[str, Any]:
        r = self.render_ms[-250:]
        return {
            "frames": self.frames, "inferred": self.inferred, "idle": self.idle, "late": self.late,
            "output_fps": round(self.frames / elapsed, 2) if elapsed > 0 else None,
            "infer_fps": round(self.inferred / elapsed, 2) if elapsed > 0 else None,
            "render_ms_p50": round(float(np.median(r)), 2) if r else None,
        }


class TalkSession:
    """Runs on its own thread; `start()`, then `wait()` or `stop()`."""

    def __init__(self, name: str, backend: LipSyncBackend, audio: Iterable[np.ndarray] | PushAudio, sink: Sink,
                 realtime: bool = True, silence_db: float = -50.0, attack: float = 0.7, release: float = 0.45,
                 on_state: Callable[[str, str, str | None], None] | None = None,
                 on_frame: Callable[[int, float], None] | None = None) -> None:
        self.name = name
        self.backend = backend
        self.audio = audio
        self.sink = sink
        self.realtime = realtime
        self.silence_db = silence_db
        self.attack, self.release = attack, release
        self.on_state = on_state
        self.on_frame = on_frame  # (frame index, openness) for observers and tests
        self.stats = SessionStats()
        self.state = "starting"
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"talk[{name}]", daemon=True)
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state == self.state and error == self.error:
            return
        self.state, self.error = state, error
        log.log(logging.WARNING if error else logging.INFO, "session %s: %s%s", self.name, state,
                f" ({error})" if error else "")
        if self.on_state is not None:
            try:
                self.on_state(self.name, state, error)
            except Exception:
                log.exception("session %s: state listener failed", self.name)

    def _chunks(self) -> Iterator[np.ndarray | None]:
        """40 ms chunks; None means 'no audio yet' (pushed input waiting for data)."""
        if isinstance(self.audio, PushAudio):
            while not self._stop.is_set():
                c = self.audio.pop()
                if c is None and self.audio.closed:
                    return
                yield c
            return
        chunker = FrameChunker()
        for block in self.audio:
            yield from chunker.push(block)
            if self._stop.is_set():
                return
        yield from chunker.flush()

    def _run(self) -> None:
        from .audio import SAMPLES_PER_FRAME

        level = 0.0
        last: np.ndarray | None = None
        t0 = time.monotonic()
        self._set_state("live")
        try:
            for chunk in self._chunks():
                if self._stop.is_set():
                    break
                due = t0 + self.stats.frames / FPS
                if self.realtime:
                    wait = due - time.monotonic()
                    if wait > 0:
                        self._stop.wait(wait)
                if chunk is None:  # pushed audio ran dry: keep the clock with silence
                    chunk = np.zeros(SAMPLES_PER_FRAME, np.float32)
                behind = self.realtime and time.monotonic() - due > 1.0 / FPS
                if behind and last is not None:
                    frame = last  # degrade visibly, never let audio drift
                    self.stats.late += 1
                    self._set_state("degraded", "generation is behind real time: frames repeated (see `late`)")
                else:
                    if self.state == "degraded":
                        self._set_state("live")  # caught up
                    silent = rms_db(chunk) < self.silence_db
                    target = 0.0 if silent else self.backend.openness(chunk)
                    k = self.attack if target > level else self.release
                    level += k * (target - level)
                    t = time.perf_counter()
                    frame = self.backend.render(level)
                    self.stats.render_ms.append((time.perf_counter() - t) * 1000)
                    if silent and level < 0.02:
                        self.stats.idle += 1
                    else:
                        self.stats.inferred += 1
                    if self.on_frame is not None:
                        self.on_frame(self.stats.frames, level)
                self.sink.write(frame, chunk)
                last = frame
                self.stats.frames += 1
            self._set_state("ended")
        except Exception as exc:  # this session only: others keep running
            self._set_state("failed", str(exc))
        finally:
            try:
                self.sink.close()
            except Exception as exc:
                log.warning("session %s: closing sink: %s", self.name, exc)

    def snapshot(self) -> dict[str, Any]:
        return {"session": self.name, "state": self.state, "error": self.error, "backend": self.backend.name,
                **self.stats.snapshot(time.monotonic() - self.started_at if self.started_at else 0.0)}
