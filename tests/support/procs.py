"""framegrid as a child process or in this event loop, an MQTT subscriber, waiting, and the real
servers of `tools.servers` (Mosquitto, GStreamer's RTSP server) the fixtures start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as paho

from tools.servers import Mosquitto, RtspServer, free_port, wait_port

__all__ = ["MODEL", "ROOT", "Framegrid", "Mosquitto", "Received", "RtspServer", "Subscriber", "free_port",
           "start_pipeline", "wait_port", "wait_until"]

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "shapes-yolo11n.pt"


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """A paho subscriber collecting every message under a topic filter (own client id)."""

    port: int
    topic: str
    persistent: bool = False  # a durable session: the broker queues QoS 1 messages while we are away
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{uuid.uuid4().hex[:8]}",
                                  clean_session=not self.persistent)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(self.topic, qos=1)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append(Received(msg.topic, msg.payload, bool(msg.retain), time.time()))

    def of(self, suffix: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def wait_for(self, predicate: Any, timeout: float, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    """Await (without blocking the loop) until `predicate()` holds; fail naming `what`."""
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def start_pipeline(config: Any, detector_factory: Any = None, config_path: Path | None = None) -> tuple[Any, Any]:
    """Run a Pipeline in this event loop until ready; returns it and an async `shutdown()`."""
    import asyncio

    from pipeline import Pipeline

    pipeline = Pipeline(config, detector_factory=detector_factory, config_path=config_path)
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop))

    async def shutdown() -> None:
        stop.set()
        await asyncio.wait_for(task, 30)

    try:
        await asyncio.wait_for(pipeline.ready.wait(), 60)
    except BaseException:
        await shutdown()
        raise
    return pipeline, shutdown


class Framegrid:
    """`framegrid run CONFIG` as a child process, its output captured to a file.

    A process the test did not stop (it failed first) is killed when the test ends, and its log is
    printed then, so the failure report shows what framegrid said.
    """

    started: ClassVar[list[Framegrid]] = []

    def __init__(self, config: Path, env: dict[str, str], log: Path, own_group: bool = False) -> None:
        self.log = log
        self._fh = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], cwd=ROOT,
                                     env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=own_group)
        Framegrid.started.append(self)

    def stop(self, sig: int = 2, timeout: float = 30, group: bool = False) -> int:
        """Signal framegrid (or, with `group`, its whole process group, as `timeout` and systemd do)."""
        if self.proc.poll() is None:
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = self.kill_with_stacks()
            raise AssertionError(f"framegrid did not stop within {timeout}s; log:\n{self.output()}") from None
        finally:
            self._fh.close()
        return rc

    def kill_with_stacks(self) -> int:
        """SIGUSR1 (every thread's stack into the log), then SIGKILL."""
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        self.proc.kill()
        return self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")
