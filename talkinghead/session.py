"""A talking-head session: avatar + audio input + sink, one video frame per 40 ms of audio.

Each 40 ms audio chunk becomes exactly one video frame, and the two travel together to the sink,
so lip sync cannot drift. In real time, frame i is due at start + i/25 s; when generation falls
behind, the session repeats its last frame for the late chunks (visible, counted, and reported
as `degraded`) and keeps the audio whole. Silence (a chunk below `silence_db`) skips the model
and shows the avatar's own frame, with a short cross-fade.

Backends come in two shapes. A per-frame backend (`openness` / `render`, the `energy` one) is
driven chunk by chunk; the session smooths its mouth opening (attack/release), which makes the
return to silence a short cross-fade. A block backend (`render_block`, MuseTalk on lipsync slots)
gets `block` chunks at a time plus `lookahead` chunks of the audio that follows (its audio window
reaches two frames ahead), and submits the voiced frames as one batch to its executor slot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .audio import FPS, SAMPLES_PER_FRAME, FrameChunker, PushAudio, fade_out, rms_db
from .offline import CROSSFADE_FRAMES

log = logging.getLogger(__name__)

# Pushed audio: how far past its due time the writer waits for the block in render before the next
# chunk goes out on the last frame (`TalkSession._repeat_starved`). A frame: a viewer's jitter buffer
# absorbs that much; longer waits made it grow (to ~100 ms with the tiny MuseTalk on two CPU cores).
STARVED_AFTER_S = 1.0 / FPS


class LipSyncBackend(Protocol):
    name: str

    def openness(self, chunk: np.ndarray) -> float: ...

    def render(self, openness: float) -> np.ndarray: ...


class BlockBackend(Protocol):
    name: str
    block: int
    lookahead: int

    def render_block(self, chunks: list[np.ndarray], voiced: list[bool], ahead: list[np.ndarray]
                     ) -> list[np.ndarray]:
        """`voiced` (loud enough, per chunk) covers `chunks` then `ahead`."""
        ...

    def idle_frame(self) -> np.ndarray: ...

    def skip(self, chunks: list[np.ndarray], voiced: list[bool]) -> None:
        """The session is behind and shows its last frame for these chunks: the backend moves on past
        them as if it had rendered them (its audio history and avatar position stay on the clock)."""
        ...


class Sink(Protocol):
    """Where frames go. A sink that queues frames for a live viewer may also have `cut()`: a barge-in
    drops what it queued, before the cut's faded frames are written."""

    def write(self, frame: np.ndarray, audio: np.ndarray) -> None: ...

    def close(self) -> None: ...


@dataclass
class SessionStats:
    frames: int = 0  # frames written (= 40 ms audio chunks)
    inferred: int = 0  # frames the backend generated
    idle: int = 0  # silent chunks: the avatar's own frame
    late: int = 0  # chunks whose frame was repeated because generation fell behind
    cut: int = 0  # chunks dropped by barge-in before they were written (rendered or not)
    cut_ms: float | None = None  # the last barge-in: from the cut to the writer applying it (its next frame)
    errors: int = 0  # chunks whose generation failed (executor error): last frame shown
    # the last 250 frames' figures: a session can run for days
    render_ms: deque[float] = field(default_factory=lambda: deque(maxlen=250))  # per frame
    # per frame the model generated, in blocks that generated any: what a spurt's first blocks will
    # cost (idle frames cost next to nothing and would make the margin too short)
    model_ms: deque[float] = field(default_factory=lambda: deque(maxlen=250))
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=250))  # pushed chunk arrival -> written

    def snapshot(self, elapsed: float) -> dict[str, Any]:
        r = list(self.render_ms)
        lat = list(self.latency_ms)
        return {
            "frames": self.frames, "inferred": self.inferred, "idle": self.idle, "late": self.late, "cut": self.cut,
            "cut_ms": self.cut_ms, "errors": self.errors,
            "output_fps": round(self.frames / elapsed, 2) if elapsed > 0 else None,
            "infer_fps": round(self.inferred / elapsed, 2) if elapsed > 0 else None,
            "render_ms_p50": round(float(np.median(r)), 2) if r else None,
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if lat else None,
            "latency_ms_p95": round(float(np.percentile(lat, 95)), 1) if lat else None,
        }


class TalkSession:
    """Runs on its own thread; `start()`, then `wait()` or `stop()`."""

    def __init__(
        self,
        name: str,
        backend: LipSyncBackend | BlockBackend,
        audio: Iterable[np.ndarray] | PushAudio,
        sink: Sink,
        realtime: bool = True,
        silence_db: float = -50.0,
        attack: float = 0.7,
        release: float = 0.45,
        on_state: Callable[[str, str, str | None], None] | None = None,
        on_frame: Callable[[int, float], None] | None = None,
    ) -> None:
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
        self._arrivals: deque[float | None] = deque()  # pushed chunks handed out, not yet written
        self._rendered = 0  # frames rendered (or repeated) and handed to the writer
        # rendered blocks not yet written, as (audio chunk, frame) pairs: the writer takes them one by one
        # at their due times; a cut (barge-in) fades or drops them. `_pending_cv` guards it, `_arrivals`
        # and `_rendered` when a cut changes them.
        self._pending: deque[deque[tuple[np.ndarray, np.ndarray]]] = deque()
        self._pending_cv = threading.Condition()
        self._rendering_done = False
        self._cut_seen = 0  # the PushAudio cut (count) applied to what the writer holds
        self._margin = 0  # frames the last spurt was put behind its arrival (what the writer may hold ahead)
        self._taken_cuts = 0  # the cut count when the block being rendered was taken
        self._cut_owed = 0  # chunks of the last cut's fade not yet given (the block in render, the held ones)
        # the block being rendered: (its chunks, the last frame handed over, the cut count when taken), for
        # a writer that reaches its due time first (`_repeat_starved`) or a cut that finds it waiting
        # (`_fade_starved`), and how many of its chunks went out ahead of the render (its frames are dropped)
        self._in_render: tuple[list[np.ndarray], np.ndarray, int] | None = None
        self._written_ahead = 0
        self._write_error: BaseException | None = None
        self._flip_logged_at = -1e9
        self._thread = threading.Thread(target=self._run, name=f"talk[{name}]", daemon=True)
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if isinstance(self.audio, PushAudio):
            self.audio.wake()
        self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state == self.state and error == self.error:
            return
        self.state, self.error = state, error
        now = time.monotonic()
        # a session near its real-time limit flips live <-> degraded every few blocks: every change is
        # published, but the log says so at most once per 10 s
        if state not in ("live", "degraded") or now - self._flip_logged_at >= 10.0:
            if state in ("live", "degraded"):
                self._flip_logged_at = now
            log.log(
                logging.WARNING if error else logging.INFO,
                "session %s: %s%s",
                self.name,
                state,
                f" ({error})" if error else "",
            )
        if self.on_state is not None:
            try:
                self.on_state(self.name, state, error)
            except Exception:
                log.exception("session %s: state listener failed", self.name)

    def _due(self) -> float:
        """When the next frame to render is due (the writer may still be writing earlier ones)."""
        return self.started_at + self._rendered / FPS

    def render_margin(self, block: int) -> int:
        """Frames a block of generated frames takes to render in real time (90th percentile of the
        measured cost per generated frame; a block's length before anything is measured), plus one
        frame of margin."""
        return int(np.ceil(self._frame_cost() * block * FPS)) + 1

    def _frame_cost(self) -> float:
        """Seconds the model takes per generated frame (90th percentile; a frame's length before any
        is measured)."""
        cost = self.stats.model_ms
        return float(np.percentile(cost, 90)) / 1000 if cost else 1.0 / FPS

    def _waited(self, held: int) -> float:
        """Seconds since the oldest of the `held` chunks (the newest entries of `_arrivals`) arrived."""
        arrived = self._arrivals[len(self._arrivals) - held] if held <= len(self._arrivals) else None
        return time.monotonic() - arrived if arrived is not None else 0.0

    def _write_loop(self) -> None:
        """Writes each rendered block's frames at their due times, so that the next block renders
        meanwhile (rendering and waiting overlap: the slot is not left idle while frames wait)."""
        cv = self._pending_cv
        try:
            while True:
                with cv:
                    while (not self._pending and not self._rendering_done and not self._fade_starved()
                           and not self._repeat_starved()):
                        cv.wait(self._starved_wait())  # (a cut is looked for at each frame's time)
                    if not self._pending:
                        return
                if self.realtime:
                    wait = self._write_due() - time.monotonic()
                    if wait > 0:
                        self._stop.wait(wait)
                with cv:  # what is first now (a cut may have changed it while this waited)
                    self._cut_pending()
                    if not self._pending:
                        continue
                    chunk, frame = self._pending[0].popleft()
                    if not self._pending[0]:
                        self._pending.popleft()
                    cv.notify_all()
                    arrived = self._arrivals.popleft() if self._arrivals else None
                self.sink.write(frame, chunk)
                self.stats.frames += 1
                if arrived is not None:
                    self.stats.latency_ms.append((time.monotonic() - arrived) * 1000)
        except BaseException as exc:  # the sink failed: the render loop ends the session with it
            with cv:
                self._write_error = exc
                cv.notify_all()

    def _hand_over(self, chunks: list[np.ndarray], frames: list[np.ndarray], cuts: int) -> None:
        """Give a rendered block to the writer; waits while the writer holds more than the margin of
        pushed audio's spurts (or one block) besides it, so that rendering keeps the whole margin ahead
        and memory stays bounded. `cuts`: the pushed audio's cut count when the block's chunks were
        taken (a cut since: they go)."""
        room = max(len(chunks), self._margin)
        with self._pending_cv:
            while (self._write_error is None and self._pending
                   and sum(len(b) for b in self._pending) > room):
                self._pending_cv.wait()
            if self._write_error is not None:
                raise self._write_error
            ahead, self._written_ahead, self._in_render = self._written_ahead, 0, None
            chunks, frames = chunks[ahead:], frames[ahead:]  # (the writer sent these out already)
            if isinstance(self.audio, PushAudio) and self.audio.cuts != cuts:  # taken before a cut
                self._cut_pending()
                keep = min(self._cut_owed, len(chunks))
                self._drop_arrivals(sum(len(b) for b in self._pending) + keep, len(chunks) - keep)
                self.stats.cut += len(chunks) - keep
                chunks, frames = fade_out(chunks[:keep]), frames[:keep]
                self._cut_owed -= keep
            if not chunks:  # all of it went out ahead of the render, or the cut took it
                return
            self._rendered += len(chunks)
            self._pending.append(deque(zip(chunks, frames, strict=True)))
            self._pending_cv.notify_all()

    def _fade_starved(self) -> bool:
        """A cut (barge-in) while the writer waits for the block in render (the model slower than real
        time): the first `cut_fade` of that block's chunks go out faded at once, on the last frame
        written, instead of after the render (up to a block's render time: ~140 ms for the tiny
        MuseTalk on two CPU cores); `_hand_over` then drops the rest of the block. Under the lock;
        True if it did."""
        if not isinstance(self.audio, PushAudio) or self._in_render is None:
            return False
        chunks, frame, taken = self._in_render
        if taken == self.audio.cuts:  # taken after the cut: nothing of it to cut
            return False
        if self.audio.cuts == self._cut_seen and not self._cut_owed:  # this cut's fade is out
            return False
        self._cut_pending()  # a new cut, nothing pending: the whole fade is owed
        first = self._written_ahead
        if first >= len(chunks):  # all of it went out ahead of the render: the sound stopped there, the
            self._cut_owed = 0  # rest of the cut goes without a fade (one after the pause would be heard)
            return False
        n = min(self._cut_owed, len(chunks) - first)
        if n <= 0:
            return False
        self._send_ahead([(c, frame) for c in fade_out(chunks[first:first + n])])
        self._cut_owed -= n
        return True

    def _repeat_starved(self) -> bool:
        """The model slower than real time: the writer is past its next frame's due time (by
        STARVED_AFTER_S) and the block in render is not out yet. Its next chunk goes out now on the last
        frame written, so the sound keeps its clock: sent late and then in a burst,
        it made a viewer's jitter buffer grow by the lateness (and a barge-in heard that much later);
        `_hand_over` drops that frame of the render. Under the lock; True if it did."""
        ahead = self._ahead_of_render()
        if ahead is None or time.monotonic() < self._write_due() + STARVED_AFTER_S:
            return False
        self._send_ahead([ahead])  # (counted as its render counts it: inferred or idle, like a cut's fade)
        return True

    def _send_ahead(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Give the writer (chunk, frame) pairs of the block in render before its render is out (its
        rendered frames for them are dropped in `_hand_over`). Under the lock."""
        self._pending.append(deque(pairs))
        self._written_ahead += len(pairs)
        self._rendered += len(pairs)

    def _ahead_of_render(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(chunk, the last frame): what the writer may send ahead of the block in render, if anything
        (not a chunk taken before a cut: `_fade_starved` fades what it owes of those, the rest goes)."""
        if not self.realtime or self._in_render is None or not isinstance(self.audio, PushAudio):
            return None
        chunks, frame, taken = self._in_render
        if taken != self.audio.cuts or self._written_ahead >= len(chunks):
            return None
        return chunks[self._written_ahead], frame

    def _write_due(self) -> float:
        """When the next frame to write is due."""
        return self.started_at + self.stats.frames / FPS

    def _starved_wait(self) -> float:
        """How long the starved writer waits before looking again: a frame, or less when a chunk of the
        block in render falls due (`_repeat_starved`) sooner."""
        if self._ahead_of_render() is None:
            return 1.0 / FPS
        return min(1.0 / FPS, max(0.001, self._write_due() + STARVED_AFTER_S - time.monotonic()))

    def _end_writing(self) -> None:
        with self._pending_cv:
            self._rendering_done = True
            self._pending_cv.notify_all()

    def _blocks(self, block: int, ahead: int) -> Iterator[tuple[list[np.ndarray | None], list[np.ndarray]]]:
        """(chunks, lookahead) pairs; a None chunk means 'no audio yet' (pushed input running dry).

        For pushed audio, `self._arrivals` holds the arrival time of every chunk handed out and
        not yet written (the session's latency figure).

        Pushed audio that runs dry is waited for until the next frame is due; then what is held
        goes out (a short block without lookahead) or one None keeps the clock.
        """
        held: list[np.ndarray] = []
        numbers: list[int] = []  # pushed audio: each held chunk's number in the queue

        def full() -> Iterator[tuple[list[np.ndarray | None], list[np.ndarray]]]:
            while len(held) >= block + ahead:
                yield list(held[:block]), held[block : block + ahead]
                del held[:block], numbers[:block]

        if isinstance(self.audio, PushAudio):
            # A block backend needs `ahead` chunks after a block, and live audio arrives in real time:
            # a spurt's first block can start only when its last lookahead chunk is in, and its frames
            # are ready a render later. So while a spurt's first block and lookahead arrive, filler
            # frames (silence, the avatar idle) keep the clock at their due times; when they are in,
            # `render_margin` more fillers go out at once, so that the block is due a render from now.
            # The spurt then plays that far behind its arrival, every block with its lookahead and on
            # time. (Before, each chunk went out without lookahead at its due time: one-frame model
            # calls, and frames late whenever a render outlasted 40 ms: 31% late over WebRTC.)
            building = False
            cuts = self.audio.cuts

            def filler(n: int = 1) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
                with self._pending_cv:  # (the writer pops arrivals)
                    for _ in range(n):
                        self._arrivals.insert(len(self._arrivals) - len(held), None)  # written before the held audio
                return [None] * n, []

            while not self._stop.is_set():
                if self.audio.cuts != cuts:  # a barge-in: what it holds of the cut audio goes too
                    cuts = self.audio.cuts
                    self._cut_held(held, numbers)
                self._taken_cuts = cuts  # what it yields next was taken after these cuts
                c = self.audio.pop()
                if c is None and not self.audio.closed:  # dry: wait for the next chunk (a block renders once its
                    # lookahead is in: the margin stays slack), at most until the next frame must be rendered
                    # (due less the render of what is held): a pause does not make the last block late
                    lead = self._frame_cost() * min(len(held), block)  # (an idle frame costs next to nothing)
                    self.audio.wait(max(0.0, self._due() - lead - time.monotonic()) if self.realtime else 0.005)
                    c = self.audio.pop()
                if c is not None:
                    building = building or (not held and ahead > 0 and self.realtime)
                    held.append(c)
                    numbers.append(self.audio.last_number)
                    self._arrivals.append(self.audio.last_arrival)
                    if building and len(held) >= block + ahead:
                        # the last `ahead` fillers see the spurt as lookahead: the model renders them, so the fade
                        # lands before speech; the margin covers their render and the first block's
                        building = False
                        margin = self._margin = max(self.render_margin(block + ahead), CROSSFADE_FRAMES)
                        if margin > ahead:
                            yield filler(margin - ahead)
                        fillers, _ = filler(min(margin, ahead))
                        yield fillers, held[:ahead]
                    if not building:
                        yield from full()
                elif self.audio.closed:
                    break
                elif held and building and self._waited(len(held)) < (block + ahead + 1) / FPS:
                    yield filler()
                elif held:  # the audio paused: what is held goes out without the lookahead it lacks
                    building = False
                    if len(held) >= block + ahead:
                        yield from full()
                    else:
                        yield list(held[:block]), []
                        del held[:block], numbers[:block]
                elif self.realtime:
                    self._arrivals.append(None)
                    yield [None], []
        else:
            chunker = FrameChunker()
            for samples in self.audio:
                for c in chunker.push(samples):
                    held.append(c)
                    yield from full()
                if self._stop.is_set():
                    return
            held.extend(chunker.flush())
        while held and not self._stop.is_set():
            yield list(held[:block]), held[block : block + ahead]
            del held[:block]

    def _cut_pending(self) -> None:
        """Apply a new cut (barge-in) of the pushed audio to the frames rendered but not yet written
        (the margin and the blocks in the writer): the first `cut_fade` keep their frames with the
        audio faded out, the rest are dropped (the frames after them come that much sooner). The fade
        still owed (when fewer were there) goes to the block being rendered and the chunks held
        (`_hand_over`, `_cut_held`), so that the cut is as near as the rendering allows. Under the lock."""
        if not isinstance(self.audio, PushAudio) or self.audio.cuts == self._cut_seen:
            return
        self._cut_seen = self.audio.cuts
        self.stats.cut_ms = round((time.monotonic() - self.audio.cut_at) * 1000, 1)
        cut = getattr(self.sink, "cut", None)  # frames a sink queued (a live viewer's) were said before it
        if cut is not None:
            cut()
        pairs = [p for blk in self._pending for p in blk]
        keep = min(self.audio.cut_fade, len(pairs))
        self._pending.clear()
        if keep:
            faded = fade_out([c for c, _ in pairs[:keep]])
            self._pending.append(deque((c, f) for c, (_, f) in zip(faded, pairs[:keep], strict=True)))
        self._drop_arrivals(keep, len(pairs) - keep)
        self._rendered -= len(pairs) - keep
        self.stats.cut += len(pairs) - keep
        self._cut_owed = self.audio.cut_fade - keep
        self._pending_cv.notify_all()

    def _drop_arrivals(self, start: int, n: int) -> None:
        """Forget the arrival times of `n` chunks from position `start` (dropped by a cut). Under the lock."""
        for _ in range(min(n, max(0, len(self._arrivals) - start))):
            del self._arrivals[start]

    def _cut_held(self, held: list[np.ndarray], numbers: list[int]) -> None:
        """A cut reaches the chunks this session took but has not rendered (a block backend's block and
        lookahead: 360 ms by default): those from before the cut get the fade still owed (see
        `_cut_pending`), the rest are dropped, and the queue's own faded chunks with them."""
        assert isinstance(self.audio, PushAudio)
        old = sum(1 for n in numbers if n < self.audio.cut_mark)  # the held chunks before the cut come first
        with self._pending_cv:
            self._cut_pending()
            if self._cut_owed < self.audio.cut_fade or old:  # the fade is on what this held: the queue's
                self.audio.drop_before(self.audio.cut_mark)  # faded chunks go too
            if not old:
                return
            keep = min(self._cut_owed, old)
            held[:keep] = fade_out(held[:keep])
            self._cut_owed -= keep
            base = len(self._arrivals) - len(held)
            for i in reversed(range(keep, old)):
                del held[i], numbers[i], self._arrivals[base + i]
            self.stats.cut += old - keep

    def _run(self) -> None:
        self._arrivals.clear()
        block = int(getattr(self.backend, "block", 1))
        ahead = int(getattr(self.backend, "lookahead", 0))
        level = 0.0
        last: np.ndarray | None = None
        self.started_at = time.monotonic()
        self._set_state("live")
        writer = threading.Thread(target=self._write_loop, name=f"talk[{self.name}].write", daemon=True)
        writer.start()
        try:
            try:
                for raw, lookahead in self._blocks(block, ahead):
                    taken = self._taken_cuts
                    if self._stop.is_set():
                        break
                    chunks = [np.zeros(SAMPLES_PER_FRAME, np.float32) if c is None else c for c in raw]
                    due = self._due()
                    behind = self.realtime and time.monotonic() - due > 1.0 / FPS
                    if behind and last is not None:
                        frames = [last] * len(chunks)  # degrade visibly, never let audio drift
                        with self._pending_cv:  # (the writer counts too)
                            self.stats.late += len(chunks)
                        if hasattr(self.backend, "skip"):  # its audio history and avatar position go on
                            self.backend.skip(chunks, self._voiced(chunks))
                        self._set_state("degraded", "generation is behind real time: frames repeated (see `late`)")
                    else:
                        if self.state == "degraded":
                            self._set_state("live")  # caught up
                        t, inferred = time.perf_counter(), self.stats.inferred
                        if last is not None and isinstance(self.audio, PushAudio):
                            with self._pending_cv:  # (a starved writer looks at it at once)
                                self._in_render = (chunks, last, taken)
                                self._pending_cv.notify_all()
                        if hasattr(self.backend, "render_block"):
                            frames = self._render_block(chunks, lookahead, last)
                        else:
                            frames, level = self._render_frames(chunks, level)
                        took = (time.perf_counter() - t) * 1000
                        self.stats.render_ms.extend([took / len(chunks)] * len(chunks))
                        if generated := self.stats.inferred - inferred:
                            self.stats.model_ms.extend([took / generated] * generated)
                    self._hand_over(chunks, frames, taken)
                    last = frames[-1]
            finally:
                self._end_writing()
                writer.join()
            if self._write_error is not None:
                raise self._write_error
            self._set_state("ended")
        except Exception as exc:  # this session only: others keep running
            self._set_state("failed", str(exc))
        finally:
            try:
                self.sink.close()
            except Exception as exc:
                log.warning("session %s: closing sink: %s", self.name, exc)

    def _render_frames(self, chunks: list[np.ndarray], level: float) -> tuple[list[np.ndarray], float]:
        """Per-frame backend: smoothed openness per chunk; silence eases back to the avatar's frame."""
        backend: Any = self.backend
        frames = []
        for chunk in chunks:
            silent = bool(rms_db(chunk) < self.silence_db)
            target = 0.0 if silent else backend.openness(chunk)
            k = self.attack if target > level else self.release
            level += k * (target - level)
            frames.append(backend.render(level))
            if silent and level < 0.02:
                self.stats.idle += 1
            else:
                self.stats.inferred += 1
            if self.on_frame is not None:
                self.on_frame(self._rendered + len(frames) - 1, level)
        return frames, level

    def _voiced(self, chunks: list[np.ndarray]) -> list[bool]:
        return [bool(rms_db(c) >= self.silence_db) for c in chunks]

    def _render_block(
        self, chunks: list[np.ndarray], lookahead: list[np.ndarray], last: np.ndarray | None
    ) -> list[np.ndarray]:
        """Block backend: the voiced chunks go to the model as one batch; an executor failure shows
        the last frame for this block (counted as `errors`) and the session goes on."""
        backend: Any = self.backend
        voiced = self._voiced([*chunks, *lookahead])
        try:
            frames = backend.render_block(chunks, voiced, lookahead)
        except Exception as exc:
            self.stats.errors += len(chunks)
            self._set_state("degraded", f"generation failed: {exc}")
            hold = last if last is not None else backend.idle_frame()
            return [hold] * len(chunks)
        generated = int(getattr(backend, "generated", sum(voiced[: len(chunks)])))
        self.stats.inferred += generated
        self.stats.idle += len(chunks) - generated
        if self.on_frame is not None:
            for k, v in enumerate(voiced[: len(chunks)]):
                self.on_frame(self._rendered + k, float(v))
        return frames

    def snapshot(self) -> dict[str, Any]:
        pushed = self.audio if isinstance(self.audio, PushAudio) else None
        audio = (
            {
                "audio_rejected": pushed.rejected,
                "audio_rejected_by": dict(pushed.rejected_by),
                "audio_gaps": pushed.gaps,
                "audio_dropped": pushed.dropped,
            }
            if pushed is not None
            else {}
        )
        return {
            "session": self.name,
            "state": self.state,
            "error": self.error,
            "backend": self.backend.name,
            **self.stats.snapshot(time.monotonic() - self.started_at if self.started_at else 0.0),
            **audio,
        }
