"""Webhooks: events POSTed to HTTP endpoints (`[[webhooks]]`).

Each hook is an event listener with its own bounded queue: the event engine hands it an event on
the loop and goes on (never waits; beyond `max_queue` the event is dropped and counted). One sender
task per hook POSTs the events in order as JSON, signed with HMAC-SHA256 when the hook has a
secret (`X-Framegrid-Signature: sha256=<hex>`, over the exact body sent), and retries a failed
delivery (timeout, connection error, HTTP 5xx, 408, 429) with exponential backoff; any other 4xx is
the receiver refusing it, not retried. Every outcome is counted (stats `webhooks`, /metrics). The
URL's credentials never reach a log line.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from typing import Any

import httpx

from pipeline.config import WebhookConfig
from pipeline.payloads import EventPayload, WebhookFigures
from streams import Backoff, redact_text, redact_url

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Framegrid-Signature"
EVENT_HEADER = "X-Framegrid-Event"
RETRIED_STATUSES = (408, 429)  # besides 5xx: the receiver asks to come back later


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for `body`: `sha256=<hex HMAC-SHA256>` (receivers recompute it)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Webhook:
    """One hook: its filter, queue, sender and counts."""

    def __init__(self, name: str, cfg: WebhookConfig, secrets: tuple[str, ...]) -> None:
        self.name = name
        self.cfg = cfg
        self.secrets = secrets
        self.url = redact_url(cfg.url)
        self.queue: asyncio.Queue[EventPayload] = asyncio.Queue(cfg.max_queue)
        self.sent = self.failed = self.dropped = self.retried = 0
        self.last_error: str | None = None
        self.pending: EventPayload | None = None  # taken off the queue, not yet delivered
        self._dropped_logged = 0

    def wants(self, event: EventPayload) -> bool:
        if event["type"] not in self.cfg.events:
            return False
        if self.cfg.streams is not None and event["stream"] not in self.cfg.streams:
            return False
        state = event["after"] or event["before"]
        return self.cfg.labels is None or (state is not None and state["label"] in self.cfg.labels)

    def put(self, event: EventPayload) -> None:
        """On the loop, from the event engine: queue the event or count it dropped; never waits."""
        if not self.wants(event):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped >= 2 * self._dropped_logged:  # 1, 2, 4, 8, ...: said, not flooded
                self._dropped_logged = self.dropped
                log.warning("webhook %s: queue full (%d waiting), %d event(s) dropped so far", self.name,
                            self.cfg.max_queue, self.dropped)

    async def run(self, client: httpx.AsyncClient) -> None:
        while True:
            self.pending = await self.queue.get()
            await self.deliver(client, self.pending)
            self.pending = None

    async def drain(self, client: httpx.AsyncClient) -> None:
        """Deliver what is pending and queued (at shutdown, the sender stopped)."""
        if self.pending is not None:
            await self.deliver(client, self.pending)
            self.pending = None
        while not self.queue.empty():
            self.pending = self.queue.get_nowait()
            await self.deliver(client, self.pending)
            self.pending = None

    def left(self) -> int:
        return self.queue.qsize() + (self.pending is not None)

    async def deliver(self, client: httpx.AsyncClient, event: EventPayload) -> bool:
        body = json.dumps(event, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", EVENT_HEADER: event["type"]}
        if self.cfg.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.cfg.secret.get_secret_value(), body)
        backoff = Backoff(base=0.5, cap=30.0)
        for attempt in range(1 + self.cfg.retries):
            if attempt:
                self.retried += 1
                await asyncio.sleep(backoff.next_delay())
            try:
                res = await client.post(self.cfg.url, content=body, headers=headers, timeout=self.cfg.timeout_s)
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            else:
                if res.is_success:
                    self.sent += 1
                    return True
                why = f"HTTP {res.status_code}"
                if res.status_code < 500 and res.status_code not in RETRIED_STATUSES:
                    break  # refused: trying again would be refused again
            self.last_error = redact_text(why, self.secrets)
        self.failed += 1
        log.warning("webhook %s: event %s of %s not delivered to %s: %s", self.name, event["type"],
                    event["stream"], self.url, self.last_error)
        return False

    def figures(self) -> WebhookFigures:
        return {"url": self.url, "queued": self.queue.qsize(), "sent": self.sent, "failed": self.failed,
                "dropped": self.dropped, "retried": self.retried, "last_error": self.last_error}


class Webhooks:
    """Every hook of the config: `put` is an event-engine listener, `run` sends until cancelled."""

    def __init__(self, hooks: list[WebhookConfig], names: list[str], secrets: tuple[str, ...]) -> None:
        self.hooks = [Webhook(name, h, secrets) for name, h in zip(names, hooks, strict=True)]

    def put(self, event: EventPayload, obj: Any = None, result: Any = None) -> None:
        if event["type"].startswith("_"):
            return  # internal (a better frame for the snapshot)
        for hook in self.hooks:
            hook.put(event)

    async def run(self) -> None:
        if not self.hooks:
            return
        async with httpx.AsyncClient(follow_redirects=False) as client, asyncio.TaskGroup() as tg:
            for hook in self.hooks:
                tg.create_task(hook.run(client), name=f"webhook[{hook.name}]")

    async def flush(self, timeout: float) -> None:
        """At shutdown, after the senders stopped and the last events ended: deliver what is left within
        `timeout` seconds; what still is not is counted dropped (and said)."""
        if not any(h.left() for h in self.hooks):
            return
        async with httpx.AsyncClient(follow_redirects=False) as client:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(h.drain(client) for h in self.hooks))
            except TimeoutError:
                pass
        for hook in self.hooks:
            if left := hook.left():
                hook.dropped += left
                log.warning("webhook %s: %d event(s) not delivered at shutdown (%.0f s allowed)", hook.name,
                            left, timeout)

    def figures(self) -> dict[str, WebhookFigures]:
        return {h.name: h.figures() for h in self.hooks}
