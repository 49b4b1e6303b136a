"""MQTT publishing with aiomqtt: bounded buffer, reconnect with jittered backoff, honest counters.

`publish()` never blocks and never raises: it appends to a bounded buffer (policy
`drop_oldest`, every drop counted) that a background task drains to the broker with a window of
messages in flight. Retained topics (availability, stream state) are also kept latest-per-topic
outside the buffer and re-sent on every connect, so a subscriber always sees current state even
after the broker restarts. `offline` is published on clean stop and registered as Last Will.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from pipeline.config import MqttConfig
from pipeline.core.stats import percentile
from pipeline.topics import Topics
from streams import Backoff, redact_text
from streams.handoff import wait_event

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    queued_mono: float = field(default_factory=time.monotonic)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as plain JSON values (a stray numpy number must not stop publishing)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot publish a {type(value).__name__} as JSON")


class _Client(aiomqtt.Client):
    """aiomqtt's client, also telling of a publish the broker refused (MQTT 5 PUBACK reason codes:
    its ACL), which aiomqtt itself ignores."""

    on_refused: Callable[[str], None] | None = None

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if getattr(reason_code, "is_failure", False) and self.on_refused is not None:
            self.on_refused(str(reason_code))
        super()._on_publish(client, userdata, mid, reason_code, properties)


HINTS = {
    "unauthorized": "the broker does not accept these credentials (mqtt.username / mqtt.password, or its ACL)",
    "tls_error": "the TLS handshake failed (mqtt.ca_file must hold the CA that signed the broker's "
                 "certificate; the certificates must be valid now)",
}


def connection_state(exc: BaseException) -> str:
    """What a failed connection means: `unauthorized` (credentials refused), `tls_error` (certificate
    checks failed, or a TLS file cannot be read), else `unavailable` (network, broker down)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError | ssl.CertificateError):
            return "tls_error"
        seen = seen.__cause__ or seen.__context__
    text = str(exc).lower()
    code = getattr(exc, "rc", None)
    if code in (4, 5, 134, 135) or "not authori" in text or "bad user name" in text:
        return "unauthorized"
    if "ssl" in text or "certificate" in text or "tls" in text or isinstance(exc, FileNotFoundError | PermissionError):
        return "tls_error"
    return "unavailable"


class Publisher:
    """Owns one MQTT connection; run `run()` as a task, call `publish()` from the loop."""

    def __init__(self, cfg: MqttConfig, host: str | None = None, port: int | None = None,
                 secrets: Sequence[str] = (), node: str | None = None) -> None:
        self.cfg = cfg
        self.node = node  # a cluster node's worker: its availability, devices and stats are its own
        self.host = host or cfg.host
        self.port = port or cfg.port
        self.topics = Topics(cfg.topic_prefix, node)  # every topic is built there
        self.client_id = cfg.client_id or f"framegrid-{socket.gethostname()}-{os.getpid()}"
        self._secrets = secrets
        self._buffer: deque[Message] = deque()
        self._retained: dict[str, Message] = {}
        self._wake = asyncio.Event()
        self._close_ev = asyncio.Event()
        self._closing = False
        self._client: aiomqtt.Client | None = None
        self.connected = False
        self.connects = 0
        self.published = 0
        self.dropped_overflow = 0  # buffer full: oldest message discarded
        self.dropped_by_kind: dict[str, int] = {}
        # acknowledged by the broker (QoS 1/2) or sent (QoS 0), by the topic's last level (detections, stats, ...)
        self.published_by_kind: dict[str, int] = {}
        self.resent = 0  # in flight when the connection broke, sent again
        self.send_ms: deque[float] = deque(maxlen=512)
        self.dropped_unencodable = 0  # payloads json could not encode (NaN, unknown types): counted, never raised
        self._subscriptions: dict[str, Any] = {}  # topic filter -> callback(topic, payload), called on the loop
        self._pending_subscriptions: dict[str, list[asyncio.Future[Any]]] = {}  # made on the next connect
        self.received = 0  # messages received on our subscriptions (talk audio)
        self.last_error: str | None = None
        self.state = "connecting"  # connected | unavailable | unauthorized | tls_error (see connection_state)
        self.denied = 0  # messages and subscriptions the broker refused (its ACL; MQTT 5 tells, 3.1.1 does not)

    @property
    def availability_topic(self) -> str:
        return self.topics.availability

    # -- producer side (event loop) -------------------------------------------------------------
    def publish(self, topic: str, payload: Any, qos: int | None = None, retain: bool = False) -> None:
        if isinstance(payload, bytes):
            data = payload
        elif isinstance(payload, str):
            data = payload.encode()
        else:
            try:
                data = json.dumps(payload, separators=(",", ":"), allow_nan=False, default=_plain).encode()
            except (TypeError, ValueError) as exc:  # a NaN or an unknown type: this message only
                kind = topic.rsplit("/", 1)[-1]
                self.dropped_unencodable += 1
                self.dropped_by_kind[kind] = self.dropped_by_kind.get(kind, 0) + 1
                log.error("mqtt: cannot encode a %s message as JSON (%s): dropped", kind, exc)
                return
        msg = Message(topic, data, self.cfg.qos if qos is None else qos, retain)
        if retain and data:
            self._retained[topic] = msg
        elif retain:  # an empty retained message clears the topic: nothing to re-send
            self._retained.pop(topic, None)
        if len(self._buffer) >= self.cfg.buffer:
            self._count_drop(self._buffer.popleft())
        self._buffer.append(msg)
        self._wake.set()

    def _count_drop(self, msg: Message) -> None:
        self.dropped_overflow += 1
        kind = msg.topic.rsplit("/", 1)[-1]
        self.dropped_by_kind[kind] = self.dropped_by_kind.get(kind, 0) + 1

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def subscribe(self, topic_filter: str, callback: Any) -> asyncio.Future[Any]:
        """Deliver messages on `topic_filter` to `callback(topic, payload)`; renewed on every connect.

        Returns a future done when the broker acknowledged the subscription: now, or while
        disconnected on the next connect.
        """
        self._subscriptions[topic_filter] = callback
        client = self._client
        loop = asyncio.get_running_loop()
        if client is not None:
            return loop.create_task(client.subscribe(topic_filter, qos=1), name="mqtt.subscribe")
        # not connected yet: done when the connection makes the subscription (a talk session is
        # `live` only once its audio topic is listened to; messages sent before would be lost)
        made: asyncio.Future[Any] = loop.create_future()
        self._pending_subscriptions.setdefault(topic_filter, []).append(made)
        return made

    def unsubscribe(self, topic_filter: str) -> None:
        self._subscriptions.pop(topic_filter, None)
        for made in self._pending_subscriptions.pop(topic_filter, []):
            made.cancel()
        client = self._client
        if client is not None:
            asyncio.get_running_loop().create_task(client.unsubscribe(topic_filter), name="mqtt.unsubscribe")

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            for topic_filter, callback in list(self._subscriptions.items()):
                if message.topic.matches(topic_filter):
                    self.received += 1
                    try:
                        callback(str(message.topic), bytes(message.payload or b""))
                    except Exception:  # a bad message or a listener's bug affects that message only
                        log.exception("mqtt: handling a message on %s failed", message.topic)

    def counters(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "connects": self.connects,
            "published": self.published,
            "buffered": len(self._buffer),
            "dropped_overflow": self.dropped_overflow,
            "dropped_unencodable": self.dropped_unencodable,
            "dropped_by_kind": dict(self.dropped_by_kind),
            "published_by_kind": dict(self.published_by_kind),
            "resent": self.resent,
            "received": self.received,
            "last_error": self.last_error,
            "state": self.state,
            "denied": self.denied,
            "send_ms": {"p50": _r(percentile(self.send_ms, 50)), "p95": _r(percentile(self.send_ms, 95))},
        }

    # -- the connection task --------------------------------------------------------------------
    def _tls_context(self) -> ssl.SSLContext | None:
        if not self.cfg.tls:
            return None
        context = ssl.create_default_context(cafile=str(self.cfg.ca_file) if self.cfg.ca_file else None)
        if self.cfg.cert_file is not None and self.cfg.key_file is not None:
            context.load_cert_chain(str(self.cfg.cert_file), str(self.cfg.key_file))
        return context

    def _make_client(self) -> aiomqtt.Client:
        v5 = self.cfg.protocol == "5" and self.cfg.url != "embedded"
        client = _Client(
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            hostname=self.host,
            port=self.port,
            identifier=self.client_id,
            username=self.cfg.user,
            password=self.cfg.secret(),
            keepalive=self.cfg.keepalive,
            tls_context=self._tls_context(),
            timeout=10,
            will=aiomqtt.Will(self.availability_topic, b"offline", qos=self.cfg.state_qos, retain=True),
        )
        client.on_refused = self._refused
        return client

    def _refused(self, reason: str, what: str = "a publish") -> None:
        """The broker refused a message or a subscription (its ACL): counted, said once, state unauthorized."""
        self.denied += 1
        error = (
            f"the broker refused {what} ({reason}): its ACL must let user {self.cfg.user or '(none)'} write "
            f"{self.topics.all} and read {self.topics.talk_audio_filter}"
        )
        if self.state != "unauthorized" or self.last_error != error:
            log.error("mqtt: %s:%d %s", self.host, self.port, error)
        self.state, self.last_error = "unauthorized", error

    async def run(self) -> None:
        """Connect, drain, reconnect forever; returns after `close()`."""
        backoff = Backoff(0.2, self.cfg.reconnect_cap)
        while not self._closing:
            try:
                async with self._make_client() as client:
                    self._client = client
                    self.connected = True
                    self.state, self.last_error = "connected", None
                    self.connects += 1
                    backoff.reset()
                    log.info("mqtt: connected to %s:%d as %s", self.host, self.port, self.client_id)
                    await client.publish(self.availability_topic, b"online", qos=self.cfg.state_qos, retain=True)
                    queued = {id(m) for m in self._buffer}  # still to be sent anyway: no duplicate
                    for msg in list(self._retained.values()):
                        if id(msg) not in queued:
                            await client.publish(msg.topic, msg.payload, qos=msg.qos, retain=True)
                    for topic_filter in list(self._subscriptions):
                        granted = await client.subscribe(topic_filter, qos=1)
                        if any(getattr(g, "is_failure", False) or g == 128 for g in granted or ()):
                            self._refused(str(granted[0]), f"the subscription to {topic_filter}")
                        for made in self._pending_subscriptions.pop(topic_filter, []):
                            if not made.done():
                                made.set_result(granted)
                    reader = asyncio.create_task(self._read(client), name="mqtt.reader")
                    try:
                        await self._drain(client, reader)
                    finally:
                        reader.cancel()
                        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                            await reader
            except (aiomqtt.MqttError, OSError) as exc:  # OSError: a TLS file that cannot be read
                error = redact_text(str(exc), self._secrets)
                state = connection_state(exc)
                if state != self.state or error != self.last_error:  # said once, not at every retry
                    if state == "unavailable":
                        log.warning(
                            "mqtt: %s:%d unavailable (%s); buffering up to %d messages",
                            self.host,
                            self.port,
                            error,
                            self.cfg.buffer,
                        )
                    else:
                        log.error(
                            "mqtt: %s:%d refused us: %s (%s); retrying every %gs, buffering up to %d messages",
                            self.host,
                            self.port,
                            HINTS[state],
                            error,
                            self.cfg.reconnect_cap,
                            self.cfg.buffer,
                        )
                self.state, self.last_error = state, error
            finally:
                self.connected = False
                self._client = None
            if self._closing:
                break
            # a refusal (credentials, certificates) will not mend itself soon: retry slowly
            delay = backoff.next_delay() if self.state == "unavailable" else self.cfg.reconnect_cap
            await wait_event(self._close_ev, delay)

    async def _drain(self, client: aiomqtt.Client, reader: asyncio.Task[None] | None = None) -> None:
        window = asyncio.Semaphore(64)  # messages in flight at once: hides broker round-trips
        inflight: dict[asyncio.Task[None], Message] = {}
        failed = asyncio.Event()

        async def send(msg: Message) -> None:
            try:
                await client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            except aiomqtt.MqttError:
                failed.set()
                raise
            finally:
                window.release()
            self.published += 1
            self.send_ms.append((time.monotonic() - msg.queued_mono) * 1000)
            kind = msg.topic.rsplit("/", 1)[-1]
            self.published_by_kind[kind] = self.published_by_kind.get(kind, 0) + 1

        try:
            while True:
                if failed.is_set():
                    raise aiomqtt.MqttError("publish failed: connection lost")
                if reader is not None and reader.done():  # the subscription side saw the connection go
                    raise aiomqtt.MqttError("connection lost")
                if not self._buffer:
                    if self._closing:
                        break
                    self._wake.clear()
                    waiter = asyncio.ensure_future(self._wake.wait())
                    fail_waiter = asyncio.ensure_future(failed.wait())
                    watch = {waiter, fail_waiter} | ({reader} if reader is not None else set())
                    await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    fail_waiter.cancel()
                    continue
                await window.acquire()
                if not self._buffer:
                    window.release()
                    continue
                msg = self._buffer.popleft()
                task = asyncio.create_task(send(msg), name="mqtt.publish")
                inflight[task] = msg
                task.add_done_callback(
                    lambda t: inflight.pop(t, None) if not t.cancelled() and t.exception() is None else None
                )
                await asyncio.sleep(0)
            if inflight:
                await asyncio.wait(set(inflight), timeout=5)
        finally:
            pending = [t for t in inflight if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            # not acknowledged (failed or cut off): send again after reconnect, in the original
            # order (at-least-once, like QoS 1 itself); insertion order of `inflight` is send order
            unacked = [m for t, m in inflight.items() if t.cancelled() or t.exception() is not None]
            for msg in reversed(unacked):
                self._buffer.appendleft(msg)
            self.resent += len(unacked)
            while len(self._buffer) > self.cfg.buffer:
                self._count_drop(self._buffer.popleft())

    async def close(self) -> None:
        """Queue `offline` behind everything buffered and let `run()` flush it and disconnect.

        The caller then awaits the `run()` task (with a timeout of its choosing). Publishing
        `offline` through the same queue keeps it ordered after the last detections.
        """
        self.publish(self.availability_topic, b"offline", qos=self.cfg.state_qos, retain=True)
        self._closing = True
        self._close_ev.set()
        self._wake.set()


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
