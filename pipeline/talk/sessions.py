"""Talk sessions: live talking heads inside the pipeline (avatar + audio in, A/V sink out).

Audio `mqtt` listens on `<prefix>/talk/<name>/audio` for s16le mono 16 kHz PCM chunks (an empty
message ends the audio); audio `webrtc` takes a browser's microphone (WHIP-style, through the HTTP
API) and `out = "webrtc"` serves the session to browsers (WHEP-style, `streams.webrtc`).
State goes to `<prefix>/talk/<name>/state` (retained) and figures into
`stats`. MuseTalk sessions run their UNet+VAE on the lipsync slots (`pipeline.talk.lipsync`, the same
slot machinery as detection), started with the first such session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import Config, TalkConfig
from pipeline.core.devices import DeviceInfo
from pipeline.core.slots import Spawn
from pipeline.errors import Conflict, NotFound, PoolError, RequestError
from pipeline.mqtt.publisher import Publisher
from pipeline.mqtt.telemetry import Telemetry
from streams import Clock, redact_text
from streams.handoff import Handoff
from talkinghead.audio import PushAudio

from .lipsync import LipSyncPool, musetalk_pool
from .say import Voice

log = logging.getLogger(__name__)

REJECT_LOG_EVERY_S = 10.0  # at most one warning per reason and session in this time


class TalkSessions:
    def __init__(
        self,
        config: Config,
        publisher: Publisher,
        telemetry: Telemetry,
        handoff: Handoff,
        clock: Clock,
        secrets: Sequence[str],
        device_facts: Callable[[], list[DeviceInfo]],
        cpu_runtimes: Callable[[], set[str]],
        on_change: Callable[[], None],
    ) -> None:
        self.config = config
        self.publisher = publisher
        self.telemetry = telemetry
        self.handoff = handoff
        self.clock = clock
        self.secrets = secrets
        self.device_facts = device_facts
        self.cpu_runtimes = cpu_runtimes
        self.on_change = on_change
        self.sessions: dict[str, Any] = {}  # talkinghead.TalkSession by name
        self.spawn: Spawn | None = None  # the composer's TaskGroup: the lipsync slots' batchers run in it
        self.lipsync: LipSyncPool | None = None  # started with the first musetalk session
        self._frontend: Any = None  # VAE + Whisper for the sessions' side (talkinghead.musetalk.MuseTalk)
        self._lock = asyncio.Lock()
        self.webrtc: dict[str, Any] = {}  # streams.webrtc.WebRtcOut of the sessions with `out = "webrtc"`
        self.mics: dict[str, Any] = {}  # streams.webrtc.MicIn of the sessions with `audio = "webrtc"`
        # `say`: text into pushed-audio sessions; utterance events on <prefix>/talk/<name>/events
        self.voice = Voice(config.tts.speech(), self._utterance_event)

    def _state(self, name: str, state: str, error: str | None, snapshot: dict[str, Any] | None = None) -> None:
        session = self.sessions.get(name)
        snap = snapshot or (session.snapshot() if session is not None else {})
        self.telemetry.session_state(name, state, error, snap)

    async def start(self, name: str, cfg: TalkConfig) -> None:
        """Start a live session. Raises on a bad avatar or sink after publishing the `failed` state."""
        from streams.sinks import AVSink
        from talkinghead import EnergyLipSync, TalkSession, prepare_avatar
        from talkinghead.audio import AudioError, iter_audio
        from talkinghead.session import Sink as TalkSink

        if name in self.sessions:
            raise ValueError(f"session {name} already exists")
        self._state(name, "starting", None)
        try:
            margin = 10  # the face box's chin margin: MuseTalk v1.5's (v1.0 has none)
            if cfg.backend == "musetalk":
                from talkinghead.musetalk import version_defaults

                margin = int(version_defaults(self.config.lipsync.version)["extra_margin"])
            avatar = await asyncio.to_thread(prepare_avatar, cfg.avatar, name, cfg.box, margin)
            backend: Any = (
                await self._musetalk_backend(name, avatar) if cfg.backend == "musetalk" else EnergyLipSync(avatar)
            )
            w, h = avatar.size
            if "webrtc" in (cfg.out, cfg.audio):
                from streams.webrtc import restrict_host_addresses

                restrict_host_addresses(self.config.webrtc.addresses)  # raises without aiortc
            if cfg.out == "webrtc":
                from streams.webrtc import WebRtcOut

                sink: TalkSink = WebRtcOut(self.handoff, name, max_viewers=self.config.webrtc.max_viewers)
            else:
                sink = await asyncio.to_thread(AVSink, cfg.out, w, h)
        except Exception as exc:
            if self.lipsync is not None:
                self.lipsync.release(name)
            self._state(name, "failed", str(exc))
            raise
        audio: Any
        if cfg.out == "webrtc":
            self.webrtc[name] = sink
        if cfg.audio == "webrtc":
            from streams.webrtc import MicIn

            audio = PushAudio()
            self.mics[name] = MicIn(name, audio)
            self._takes_text(name, audio)
        elif cfg.audio == "mqtt":
            push = PushAudio()

            warned: dict[str, float] = {}

            def on_audio(_topic: str, payload: bytes) -> None:
                if not payload:
                    push.close()
                    return
                try:
                    push.push_payload(payload)
                except AudioError as exc:  # this chunk only: counted by reason in the session's figures
                    now = self.clock.mono()
                    if now - warned.get(exc.reason, -1e9) >= REJECT_LOG_EVERY_S:  # not a line per bad chunk
                        warned[exc.reason] = now
                        log.warning(
                            "session %s: audio chunk refused (%s): %s (%d refused so far)",
                            name,
                            exc.reason,
                            exc,
                            push.rejected,
                        )

            audio = push
            self._takes_text(name, push)
            subscribed = self.publisher.subscribe(self.publisher.topics.talk_audio(name), on_audio)
            # `live` must mean the audio topic is listened to: wait for the broker's SUBACK (also
            # when the connection is still being made: the subscription then comes with it)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await asyncio.shield(subscribed)
        else:
            audio = iter_audio(cfg.audio)

        def on_state(session: str, state: str, error: str | None) -> None:  # on the session's thread
            self.handoff.call(self._state, session, state, error)

        session = TalkSession(name, backend, audio, sink, realtime=True, on_state=on_state)
        self.sessions[name] = session
        session.start()
        log.info(
            "session %s: started (%s -> %s)",
            name,
            cfg.audio if cfg.audio in ("mqtt", "webrtc") else redact_text(cfg.audio, tuple(self.secrets)),
            redact_text(cfg.out, tuple(self.secrets)),
        )

    async def start_configured(self) -> None:
        """The config's enabled sessions; one that cannot start says so on its state topic, the others run."""
        for name, cfg in self.config.talk.items():
            if cfg.enabled:
                with contextlib.suppress(Exception):
                    await self.start(name, cfg)

    def _takes_text(self, name: str, push: PushAudio) -> None:
        """A session with pushed audio also speaks text (`say`, API or `<prefix>/talk/<name>/say`), and
        its utterances (texts and pushed spurts) get ids and events."""

        def on_say(_topic: str, payload: bytes) -> None:  # text, or {"text": ..., "voice": ...}
            try:
                body = json.loads(payload) if payload[:1] == b"{" else {"text": payload.decode("utf-8")}
                self.say(name, str(body.get("text", "")), body.get("voice"), bool(body.get("interrupt")))
            except (ValueError, AttributeError, RequestError) as exc:
                log.warning("session %s: say refused: %s", name, exc)

        self.voice.attach(name, push)
        self.publisher.subscribe(self.publisher.topics.talk_say(name), on_say)

    def utterance_events(self, name: str, after: int) -> list[dict[str, Any]]:
        """Session `name`'s utterance events after sequence number `after` (NotFound: no such session)."""
        if name not in self.sessions:
            raise NotFound(f"no session {name}")
        return self.voice.events(name, after)

    async def stop(self, name: str) -> None:
        session = self.sessions.pop(name, None)
        if session is None:
            raise KeyError(f"no session {name}")
        self.publisher.unsubscribe(self.publisher.topics.talk_audio(name))
        self.publisher.unsubscribe(self.publisher.topics.talk_say(name))
        self.voice.detach(name)
        mic = self.mics.pop(name, None)
        if mic is not None:
            await mic.close()
        await asyncio.to_thread(session.stop)
        out = self.webrtc.pop(name, None)
        if out is not None:
            await out.close_all()
        if self.lipsync is not None:
            self.lipsync.release(name)
        self._state(name, "stopped", None, session.snapshot())

    def say(self, name: str, text: str, voice: str | None = None, interrupt: bool = False) -> str:
        """Speak `text` in session `name` (after what it was given before, or cutting it: `interrupt`)
        -> the utterance's id."""
        if name not in self.sessions:
            raise NotFound(f"no session {name}")
        return self.voice.say(name, text, voice, interrupt)

    def interrupt(self, name: str) -> str:
        """Cut the utterance session `name` is saying -> its id (NotFound when it says none)."""
        if name not in self.sessions:
            raise NotFound(f"no session {name}")
        cut = self.voice.interrupt(name)
        if cut is None:
            raise NotFound(f"session {name} is saying nothing")
        return cut

    def _utterance_event(self, name: str, payload: dict[str, Any]) -> None:  # on the session's say thread
        self.handoff.call(self.publisher.publish, self.publisher.topics.talk_events(name), payload)

    # -- WebRTC signalling (WHEP-style viewers of `out = "webrtc"`, WHIP-style microphones for `audio`) ----
    def _peer(self, name: str, kind: str) -> Any:
        if name not in self.sessions:
            raise NotFound(f"no session {name}")
        table, what = (self.webrtc, "out") if kind == "whep" else (self.mics, "audio")
        if name not in table:
            raise Conflict(f'session {name} has no WebRTC {what} (set {what} = "webrtc")')
        return table[name]

    async def webrtc_offer(self, name: str, kind: str, sdp: str) -> tuple[str | None, str]:
        """A browser's SDP offer: `whep` adds a viewer of the session's picture and sound, `whip` takes
        its microphone as the session's audio -> (the viewer's id, or None for whip; the SDP answer).
        NotFound / Conflict (no such session, no WebRTC on that side, or the offer was refused)."""
        from streams.webrtc import WebRtcError

        peer = self._peer(name, kind)
        try:
            if kind == "whep":
                viewer, answer = await peer.offer(sdp)
                return viewer, answer
            return None, await peer.offer(sdp)
        except WebRtcError as exc:
            raise Conflict(str(exc)) from None

    async def webrtc_leave(self, name: str, viewer: str) -> None:
        """A viewer hangs up (NotFound when the session has no such viewer)."""
        if not await self._peer(name, "whep").drop(viewer):
            raise NotFound(f"session {name} has no viewer {viewer}")

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(name) for name in list(self.sessions)))
        if self.lipsync is not None:
            with contextlib.suppress(Exception):
                await self.lipsync.close()

    async def _musetalk_backend(self, name: str, avatar: Any) -> Any:
        """A live MuseTalk backend for one session, on the lipsync slots (started with the first session)."""
        from talkinghead.live import MuseTalkLive

        pool, frontend = await self.ensure_lipsync()
        faces = await asyncio.to_thread(frontend.prepare_faces, avatar)
        slot = pool.place(name)
        log.info("session %s: MuseTalk on %s", name, slot)
        lcfg = self.config.lipsync
        return MuseTalkLive(
            frontend,
            faces,
            lambda jobs: pool.submit(name, jobs),
            block=lcfg.block,
            timeout=lcfg.timeout,
            lookahead=-(-lcfg.lookahead_ms // 40),
            always=lcfg.render_silence == "always",
            whisper_on_slot=pool.whisper_on_slot,
        )

    async def ensure_lipsync(self) -> tuple[LipSyncPool, Any]:
        """The lipsync slots and the MuseTalk front end (VAE + Whisper), started on first use."""
        import importlib

        # torch, diffusers and transformers take seconds to import: not on the loop (a cluster node's
        # loop answers the head's pings; a single process's serves the API and publishes)
        musetalk = await asyncio.to_thread(importlib.import_module, "talkinghead.musetalk")
        MuseTalk = musetalk.MuseTalk

        lcfg = self.config.lipsync
        assert lcfg.weights is not None  # the config requires it for musetalk sessions
        async with self._lock:
            if self.lipsync is None:
                facts = await asyncio.to_thread(self.device_facts)
                pool = musetalk_pool(
                    lcfg,
                    self.config.pipeline,
                    self.config.devices.usable_fraction,
                    facts,
                    on_change=self.on_change,
                    clock=self.clock,
                    spawn=self.spawn,
                )
                others = {r for r in self.cpu_runtimes() if r != "torch"}
                if others and "cpu" in pool.devices:
                    raise PoolError(
                        f"MuseTalk runs on torch, and this process's CPU already runs "
                        f"{', '.join(sorted(others))} for detection: one inference runtime per "
                        "process on the CPU (run talking heads in a second framegrid process, "
                        "or give MuseTalk a GPU)"
                    )
                frontend = MuseTalk(
                    lcfg.weights,
                    lcfg.version,
                    device=pool.devices[0],
                    parts={"vae", "whisper"},
                    parsing_mode=lcfg.parsing_mode,
                    cheek_width=lcfg.cheek_width,
                )
                await asyncio.to_thread(frontend.load)
                await pool.start()
                self._frontend, self.lipsync = frontend, pool
                self.on_change()
        assert self.lipsync is not None
        return self.lipsync, self._frontend

    def snapshot(self) -> dict[str, Any]:
        return {
            name: {
                **s.snapshot(),
                "slot": self.lipsync.slot_of(name) if self.lipsync else None,
                **(self.webrtc[name].snapshot() if name in self.webrtc else {}),
                **self.voice.figures(name),
            }
            for name, s in self.sessions.items()
        }
