"""Local servers for tests and benchmarks: a real Mosquitto broker and the gst-rtsp-server cameras.

Both listen on 127.0.0.1 on free ports and are stopped by their owner.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, which has python3-gi for the RTSP server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_child(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """Stop a `framegrid run` child as a user does (SIGINT), killing it if it has not ended in `timeout`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def broker_store(port: int) -> Path:
    """A folder for a persistent Mosquitto's database that the broker can reach and write.

    Started as root, Mosquitto drops to its own user: the folder must be writable by that user and
    every folder above it passable, which a test's private temporary folder (mode 0700) is not. Without
    this it cannot save its sessions when stopped, and a "persistent" broker forgets every durable
    subscriber (and the messages queued for it) across a restart. Removed when the process exits.
    """
    store = Path(tempfile.mkdtemp(prefix=f"fg-mosquitto-{port}-"))  # under the system's /tmp (mode 1777)
    atexit.register(shutil.rmtree, store, ignore_errors=True)
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("mosquitto")
        except KeyError:
            return store
        os.chown(store, user.pw_uid, user.pw_gid)
    return store


class Mosquitto:
    """A real Mosquitto broker on a fixed loopback port; can be stopped and restarted."""

    def __init__(self, workdir: Path, port: int | None = None, persistent: bool = False,
                 security: str = "allow_anonymous true\n", scheme: str = "mqtt") -> None:
        """`security`: the listener's access lines (default: anyone); `scheme` mqtts for a TLS listener."""
        self.port = port or free_port()
        self.scheme = scheme
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        persistence = "persistence false\n"
        if persistent:
            store = broker_store(self.port)
            # Mosquitto acknowledges a message and then discards it when an offline durable subscriber's
            # queue is full (max_queued_messages, default 1000; 2.0.11 discarded beyond ~500 in a burst):
            # sized for a broker restart plus framegrid's buffered results flushed at once
            persistence = (f"persistence true\npersistence_location {store}/\n"
                           "max_queued_messages 100000\n")
        self.conf.write_text(f"per_listener_settings false\nlistener {self.port} 127.0.0.1\n{security}{persistence}")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


class RtspServer:
    """tools/rtsp_server.py (gst-rtsp-server) serving files; can be killed and restarted."""

    def __init__(self, mounts: dict[str, Path], port: int | None = None, user: str | None = None,
                 password: str | None = None, records: dict[str, Path] | None = None) -> None:
        self.mounts = mounts
        self.records = records or {}
        self.port = port or free_port()
        self.user, self.password = user, password
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        cmd = [SYSTEM_PYTHON, str(ROOT / "tools" / "rtsp_server.py"), "--port", str(self.port)]
        for name, path in self.mounts.items():
            cmd += ["--mount", f"{name}={path}"]
        for name, path in self.records.items():
            cmd += ["--record", f"{name}={path}"]
        if self.user:
            cmd += ["--user", self.user, "--password", self.password or ""]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"rtsp server did not start: {line!r} {err}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.communicate(timeout=10)  # reaps it and closes its pipes
            self.proc = None

    def url(self, name: str, with_auth: bool = True) -> str:
        auth = f"{self.user}:{self.password}@" if (self.user and with_auth) else ""
        return f"rtsp://{auth}127.0.0.1:{self.port}/{name}"
