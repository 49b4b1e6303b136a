"""Text spoken by live sessions: `say` turns text into speech (`talkinghead.tts`) and feeds it into a
session's pushed audio (`audio = "mqtt"`), in the order the texts came, paced to real time.

Each session has one feeder thread and a queue of utterances. An utterance is synthesised as it
is spoken: its first block goes into the session as soon as espeak-ng writes it, and no more than
`LOOKAHEAD_S` of speech waits in the session's audio queue (so a long text never overflows the
bounded queue, which drops the oldest audio). Pushed PCM chunks and spoken texts share the queue:
what came first is said first.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import Conflict, Invalid
from talkinghead.audio import PushAudio
from talkinghead.tts import MAX_TEXT, Speech, TtsError

log = logging.getLogger(__name__)

LOOKAHEAD_S = 1.0  # speech waiting in a session's audio queue at most (its queue holds 10 s)


@dataclass
class _Utterance:
    id: str
    text: str
    voice: str | None
    asked: float  # monotonic time of the request


@dataclass
class _Feeder:
    push: PushAudio
    todo: queue.Queue[_Utterance | None] = field(default_factory=queue.Queue)
    thread: threading.Thread | None = None
    said: int = 0
    failed: int = 0
    first_audio_ms: float | None = None  # of the last utterance: its request (or turn) to its first audio queued
    last_error: str | None = None


class Voice:
    """The `say` side of every live session with pushed audio."""

    def __init__(self, speech: Speech) -> None:
        self.speech = speech
        self._feeders: dict[str, _Feeder] = {}
        self._ids = itertools.count(1)

    def attach(self, session: str, push: PushAudio) -> None:
        feeder = _Feeder(push)
        feeder.thread = threading.Thread(target=self._run, args=(session, feeder), name=f"talk[{session}].say",
                                         daemon=True)
        self._feeders[session] = feeder
        feeder.thread.start()

    def detach(self, session: str) -> None:
        feeder = self._feeders.pop(session, None)
        if feeder is not None:
            feeder.todo.put(None)

    def say(self, session: str, text: str, voice: str | None = None) -> str:
        """Queue `text` for `session` -> the utterance's id. Conflict (no pushed audio, or it ended), Invalid."""
        feeder = self._feeders.get(session)
        if feeder is None:
            raise Conflict(f'session {session} takes no text: it needs audio = "mqtt"')
        if not text.strip():
            raise Invalid("text is empty", [("text", "empty")])
        if len(text) > MAX_TEXT:
            raise Invalid(f"text of {len(text)} characters: at most {MAX_TEXT}", [("text", "too long")])
        if feeder.push.closed:
            raise Conflict(f"session {session}: its audio has ended")
        utterance = _Utterance(f"{session}-{next(self._ids)}", text, voice, time.monotonic())
        feeder.todo.put(utterance)
        return utterance.id

    def figures(self, session: str) -> dict[str, Any]:
        f = self._feeders.get(session)
        if f is None:
            return {}
        return {"say": {"said": f.said, "failed": f.failed, "waiting": f.todo.qsize(),
                        "first_audio_ms": None if f.first_audio_ms is None else round(f.first_audio_ms, 1),
                        "last_error": f.last_error}}

    def _run(self, session: str, feeder: _Feeder) -> None:
        while (utterance := feeder.todo.get()) is not None:
            turn = max(utterance.asked, time.monotonic())  # the request, or its turn if it waited for others
            try:
                first = True
                for block in self.speech.stream(utterance.text, utterance.voice):
                    while feeder.push.queued_s > LOOKAHEAD_S and session in self._feeders:
                        time.sleep(0.01)
                    if session not in self._feeders:
                        return  # the session stopped
                    feeder.push.push_samples(block)
                    if first:
                        feeder.first_audio_ms, first = (time.monotonic() - turn) * 1000, False
                feeder.said += 1
            except TtsError as exc:
                feeder.failed += 1
                feeder.last_error = str(exc)
                log.warning("session %s: utterance %s not spoken: %s", session, utterance.id, exc)
