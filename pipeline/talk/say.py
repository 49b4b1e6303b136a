"""Text spoken by live sessions: `say` turns text into speech (`talkinghead.tts`) and feeds it into a
session's pushed audio (`audio = "mqtt"`), in the order the texts came, paced to real time.

Each session has one feeder thread and a queue of utterances. An utterance is synthesised as it
is spoken: its first block goes into the session as soon as espeak-ng writes it, and no more than
`LOOKAHEAD_S` of speech waits in the session's audio queue (so a long text never overflows the
bounded queue, which drops the oldest audio). Pushed PCM chunks and spoken texts share the queue:
what came first is said first.

Each utterance reports `started` (the session took its first audio), then `finished` (it took its
last) or `interrupted`: `interrupt` (or a `say` with `interrupt`) cuts what is being said at the next
frame, keeping `FADE_CHUNKS` frames of it (`talkinghead.audio`) faded out to silence so the voice and
the mouth close instead of stopping mid-syllable; a barge-in `say` also drops the utterances still waiting.

Audio pushed from outside (PCM over MQTT, a WebRTC microphone) is an utterance too, one per spurt
(`talkinghead.audio.Spurt`: voiced audio until `SPURT_GAP_S` without): a watcher thread gives each
its id and reports it the same way, and `interrupt` cuts it as it cuts text. The events also go into
a bounded log (`events`) that the API's server-sent events read.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import Conflict, Invalid
from talkinghead.audio import SPURT_GAP_S, PushAudio, Spurt
from talkinghead.tts import MAX_TEXT, Speech, TtsError

log = logging.getLogger(__name__)

LOOKAHEAD_S = 1.0  # speech waiting in a session's audio queue at most (its queue holds 10 s)
EVENT_VERSION = 1
WATCH_S = 0.02  # how often pushed audio's spurts are looked at
EVENT_LOG = 1000  # utterance events kept for the API's server-sent events (all sessions)


@dataclass
class _Utterance:
    id: str
    text: str
    voice: str | None
    asked: float  # monotonic time of the request
    source: str = "text"  # or "audio": a spurt of pushed audio


@dataclass
class _Feeder:
    push: PushAudio
    todo: queue.Queue[_Utterance | None] = field(default_factory=queue.Queue)
    lock: threading.Lock = field(default_factory=threading.Lock)  # a push and a cut never interleave
    current: _Utterance | None = None
    cut: bool = False  # the current utterance was interrupted
    said: int = 0
    interrupted: int = 0
    failed: int = 0
    first_audio_ms: float | None = None  # of the last utterance: its request (or turn) to its first audio queued
    last_error: str | None = None
    spurt: Spurt | None = None  # the pushed audio's spurt followed (PushAudio updates its end)
    heard: _Utterance | None = None  # its utterance, until it ends
    heard_started: bool = False


Event = Callable[[str, dict[str, Any]], None]  # (session, event payload)


class Voice:
    """The `say` side of every live session with pushed audio."""

    def __init__(self, speech: Speech, on_event: Event | None = None) -> None:
        self.speech = speech
        self.on_event = on_event
        self._feeders: dict[str, _Feeder] = {}
        self._ids = itertools.count(1)
        self._log: deque[tuple[int, str, dict[str, Any]]] = deque(maxlen=EVENT_LOG)  # (seq, session, event)
        self._seq = 0
        self._log_lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def attach(self, session: str, push: PushAudio) -> None:
        feeder = _Feeder(push)
        self._feeders[session] = feeder
        threading.Thread(target=self._run, args=(session, feeder), name=f"talk[{session}].say", daemon=True).start()
        with self._log_lock:
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(target=self._watch, name="talk.spurts", daemon=True)
                self._watcher.start()

    def events(self, session: str, after: int = 0) -> list[dict[str, Any]]:
        """The utterance events of `session` logged after sequence number `after` (oldest first; each
        carries its `seq`). The log keeps the last EVENT_LOG events of all sessions."""
        with self._log_lock:
            return [{**e, "seq": seq} for seq, name, e in self._log if name == session and seq > after]

    def detach(self, session: str) -> None:
        feeder = self._feeders.pop(session, None)
        if feeder is not None:
            feeder.todo.put(None)
            with feeder.lock:
                if feeder.heard is not None and feeder.spurt is not None:
                    self._end_heard(session, feeder, "finished" if feeder.push.taken >= feeder.spurt.end
                                    else "interrupted")

    def say(self, session: str, text: str, voice: str | None = None, interrupt: bool = False) -> str:
        """Queue `text` for `session` (after what waits, or instead of it: `interrupt`) -> the utterance's
        id. Conflict (no pushed audio, or it ended), Invalid."""
        feeder = self._feeder(session)
        if not text.strip():
            raise Invalid("text is empty", [("text", "empty")])
        if len(text) > MAX_TEXT:
            raise Invalid(f"text of {len(text)} characters: at most {MAX_TEXT}", [("text", "too long")])
        if feeder.push.closed:
            raise Conflict(f"session {session}: its audio has ended")
        if interrupt:
            self._drop_waiting(session, feeder)
            self.interrupt(session)
        utterance = _Utterance(f"{session}-{next(self._ids)}", text, voice, time.monotonic())
        feeder.todo.put(utterance)
        return utterance.id

    def interrupt(self, session: str) -> str | None:
        """Cut the utterance being said, text or a spurt of pushed audio (at the next frame, with a
        short fade) -> its id, or None."""
        feeder = self._feeder(session)
        with feeder.lock:
            current = feeder.current if not feeder.cut else None
            heard = feeder.heard
            if current is None and heard is None:
                return None
            feeder.cut = feeder.cut or current is not None
            feeder.push.cut()
            if heard is not None:
                self._end_heard(session, feeder, "interrupted")
        return current.id if current is not None else heard.id if heard is not None else None

    def figures(self, session: str) -> dict[str, Any]:
        f = self._feeders.get(session)
        if f is None:
            return {}
        return {"say": {"said": f.said, "interrupted": f.interrupted, "failed": f.failed, "waiting": f.todo.qsize(),
                        "speaking": f.current.id if f.current else f.heard.id if f.heard else None,
                        "first_audio_ms": None if f.first_audio_ms is None else round(f.first_audio_ms, 1),
                        "last_error": f.last_error}}

    def _feeder(self, session: str) -> _Feeder:
        feeder = self._feeders.get(session)
        if feeder is None:
            raise Conflict(f'session {session} takes no text: it needs pushed audio (audio = "mqtt" or "webrtc")')
        return feeder

    def _drop_waiting(self, session: str, feeder: _Feeder) -> None:
        while True:
            try:
                waiting = feeder.todo.get_nowait()
            except queue.Empty:
                return
            if waiting is None:  # detached meanwhile: keep the stop
                feeder.todo.put(None)
                return
            feeder.interrupted += 1
            self._event(session, waiting, "interrupted")

    def _event(self, session: str, utterance: _Utterance, kind: str) -> None:
        payload = {"v": EVENT_VERSION, "session": session, "utterance": utterance.id, "source": utterance.source,
                   "event": kind, "at": round(time.time(), 3)}
        with self._log_lock:
            self._seq += 1
            self._log.append((self._seq, session, payload))
        if self.on_event is not None:
            try:
                self.on_event(session, payload)
            except Exception:
                log.exception("session %s: utterance event listener failed", session)

    def _watch(self) -> None:
        """Follows every session's pushed audio: a new spurt is a new utterance (`started` once the
        session takes its first chunk), `finished` once its last is taken and it has ended."""
        while True:
            with self._log_lock:
                if not self._feeders:
                    self._watcher = None
                    return
            for session, feeder in list(self._feeders.items()):
                with feeder.lock:
                    self._follow(session, feeder)
            time.sleep(WATCH_S)

    def _follow(self, session: str, f: _Feeder) -> None:  # under f.lock
        newest = f.push.spurt
        if newest is not None and newest is not f.spurt:
            if f.heard is not None:
                self._end_heard(session, f, "finished")
            f.spurt, f.heard, f.heard_started = newest, _Utterance(
                f"{session}-{next(self._ids)}", "", None, time.monotonic(), "audio"), False
        sp = f.spurt
        if f.heard is None or sp is None:
            return
        taken = f.push.taken
        if not f.heard_started and taken > sp.first:
            f.heard_started = True
            self._event(session, f.heard, "started")
        if taken >= sp.end and time.monotonic() - sp.last_voiced > SPURT_GAP_S:
            self._end_heard(session, f, "finished")

    def _end_heard(self, session: str, f: _Feeder, kind: str) -> None:  # under f.lock
        assert f.heard is not None
        if not f.heard_started:
            self._event(session, f.heard, "started")
        if kind == "finished":
            f.said += 1
        else:
            f.interrupted += 1
        self._event(session, f.heard, kind)
        f.heard, f.heard_started = None, False

    def _run(self, session: str, feeder: _Feeder) -> None:
        while (utterance := feeder.todo.get()) is not None:
            with feeder.lock:
                feeder.current, feeder.cut = utterance, False
            try:
                self._speak(session, feeder, utterance)
            finally:
                with feeder.lock:
                    feeder.current = None

    def _speak(self, session: str, feeder: _Feeder, utterance: _Utterance) -> None:
        push, turn = feeder.push, max(utterance.asked, time.monotonic())  # its request, or its turn
        first_chunk, started = push.pushed, False

        def progress() -> None:
            nonlocal started
            if not started and push.taken > first_chunk:
                started = True
                self._event(session, utterance, "started")

        try:
            for block in self.speech.stream(utterance.text, utterance.voice):
                while push.queued_s > LOOKAHEAD_S and not feeder.cut and session in self._feeders:
                    progress()
                    time.sleep(0.01)
                with feeder.lock:
                    if feeder.cut or session not in self._feeders:
                        break
                    if push.pushed == first_chunk:
                        feeder.first_audio_ms = (time.monotonic() - turn) * 1000
                    push.push_samples(block)
                progress()
            else:
                with feeder.lock:
                    if not feeder.cut:
                        push.push_samples(np.zeros(0, np.float32), end=True)  # its last partial frame, padded
        except TtsError as exc:
            feeder.failed += 1
            feeder.last_error = str(exc)
            log.warning("session %s: utterance %s not spoken: %s", session, utterance.id, exc)
            self._event(session, utterance, "failed")
            return
        last_chunk = push.pushed
        while not feeder.cut and push.taken < last_chunk and session in self._feeders:
            progress()
            time.sleep(0.01)
        progress()
        if feeder.cut:
            feeder.interrupted += 1
            self._event(session, utterance, "interrupted")
        elif started or push.taken >= last_chunk:
            feeder.said += 1
            if not started:
                self._event(session, utterance, "started")
            self._event(session, utterance, "finished")
