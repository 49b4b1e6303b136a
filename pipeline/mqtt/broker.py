"""The embedded MQTT broker (amqtt in a child process), for `mqtt.url = "embedded"`.

It exists so the default config runs on a fresh machine with nothing else installed. It is a
demo convenience, not a production broker: amqtt round-trips QoS 1 in tens of milliseconds
where Mosquitto takes well under one. It runs in its own process so its event loop and its
failures never touch the pipeline's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import socket
import time
from typing import Any

from pipeline.config import MqttConfig

from .publisher import Publisher

log = logging.getLogger(__name__)


def _serve(host: str, port: int, ready: Any) -> None:  # runs in the child process
    import signal

    # Ctrl-C, and `timeout` or a service manager stopping the process group, reach every process
    # of the group. The parent decides when the broker stops (after it has published its last
    # messages and `offline`), so the child leaves the group, ignores SIGINT and ends on the
    # SIGTERM the parent sends, or when the parent is gone.
    parent = os.getppid()
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING)
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 256}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def main() -> None:
        broker = Broker(config)
        await broker.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.set()
        while not stop.is_set() and os.getppid() == parent:  # an orphan stops by itself
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.shutdown(), 3)

    asyncio.run(main())


class EmbeddedBroker:
    """Starts amqtt on host:port in a child process; context manager; `port` 0 picks a free one."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port or _free_port(host)
        self._proc: Any = None

    def start(self, timeout: float = 15.0) -> None:
        if not _port_free(self.host, self.port):
            raise RuntimeError(
                f"embedded MQTT broker: {self.host}:{self.port} is already in use; set mqtt.embedded_port "
                "to a free port, or point mqtt.url at the broker that is listening there"
            )
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        self._proc = ctx.Process(target=_serve, args=(self.host, self.port, ready),
                                 name="framegrid-embedded-broker", daemon=True)
        self._proc.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.wait(0.1):
                log.info("embedded MQTT broker (amqtt) listening on %s:%d", self.host, self.port)
                return
            if not self._proc.is_alive():
                break
        self.stop()
        raise RuntimeError(f"embedded MQTT broker did not start on {self.host}:{self.port}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(2)
        self._proc = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def publisher_for(mqtt: MqttConfig, secrets: list[str],
                        node: str | None) -> tuple[Publisher, EmbeddedBroker | None]:
    """The publisher of `mqtt`, and the embedded broker it talks to when `url = "embedded"` (started
    here; the caller stops it after the publisher has said `offline`)."""
    if mqtt.url != "embedded":
        return Publisher(mqtt, secrets=secrets, node=node), None
    broker = EmbeddedBroker("127.0.0.1", mqtt.embedded_port)
    await asyncio.to_thread(broker.start)
    return Publisher(mqtt, "127.0.0.1", broker.port, secrets=secrets, node=node), broker
