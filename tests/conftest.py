"""Fixtures: real servers on loopback (Mosquitto, GStreamer's RTSP server), rendered test videos,
and the expensive things built once per run (tiny MuseTalk weights and their loaded model, a face
photo, a certificate authority). Helpers live in `tests.support`; no test module imports another.

Test videos are rendered at test time from `streams.synthetic` (ground truth known per frame).
Each server gets a free port; each test uses its own topic prefix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.media import write_face_image
from tests.support.procs import Framegrid, Mosquitto
from tests.support.tls import Pki, make_pki

if TYPE_CHECKING:
    from talkinghead.musetalk import MuseTalk

# keep ultralytics' settings and caches of in-process tests out of the home folder
os.environ.setdefault("FRAMEGRID_STATE_DIR", str(Path(tempfile.gettempdir()) / "framegrid-test-state"))


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def scenes() -> dict[str, Any]:
    from streams.synthetic import MovingScene

    return {"cam1": MovingScene(seed=11), "cam2": MovingScene(seed=12)}


@pytest.fixture(scope="session")
def videos(media_dir: Path, scenes: dict[str, Any]) -> dict[str, Path]:
    from streams.synthetic import write_video

    out = {}
    for name, scene in scenes.items():
        path = media_dir / f"{name}.mp4"
        write_video(path, scene, seconds=60)
        out[name] = path
    return out


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def topic_prefix() -> str:
    return f"fgtest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def framegrid_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = dict(os.environ)
    env["FRAMEGRID_STATE_DIR"] = str(tmp_path_factory.getbasetemp() / "state")
    env["PYTHONUNBUFFERED"] = "1"
    return env



@pytest.fixture(autouse=True)
def _reap_framegrid() -> Iterator[None]:
    Framegrid.started.clear()
    yield
    for fg in Framegrid.started:
        if fg.proc.poll() is None:
            fg.kill_with_stacks()
            print(f"framegrid left running by the test; its log:\n{fg.output()[-20000:]}")
        fg._fh.close()  # (a failed test never reached stop(): its log file must not leak into later tests)


# -- built once per run ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def face_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real photo with a frontal face (scikit-image's astronaut)."""
    return write_face_image(tmp_path_factory.mktemp("avatar"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random MuseTalk v1.5 weights of the real classes in the official layout (no face parser)."""
    from tools.make_tiny_musetalk import make

    return make(tmp_path_factory.mktemp("musetalk"), "v15")


@pytest.fixture(scope="session")
def musetalk_model(tiny: Path) -> MuseTalk:
    """The tiny weights loaded whole on the CPU (tests that patch it restore what they patch)."""
    from talkinghead.musetalk import MuseTalk

    m = MuseTalk(tiny, "v15", device="cpu")
    m.load()
    return m


@pytest.fixture(scope="session")
def musetalk_tiny_shape(tmp_path_factory: pytest.TempPathFactory) -> MuseTalk:
    """MuseTalk whose Whisper encoder has whisper-tiny's shape (4 layers, d_model 384: what v1.5 runs),
    random weights (whisper-tiny itself cannot be downloaded here), loaded on the CPU."""
    from talkinghead.musetalk import MuseTalk
    from tools.make_tiny_musetalk import make

    m = MuseTalk(make(tmp_path_factory.mktemp("musetalk-tiny-shape"), "v15", whisper="tiny-shape"), "v15")
    m.load()
    return m


@pytest.fixture(scope="session")
def shared_dir() -> Iterator[Path]:
    """Files a broker reads: Mosquitto drops root for its own user, which cannot enter pytest's
    private temporary folders."""
    d = Path(tempfile.mkdtemp(prefix="fg-mqtts-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def pki(shared_dir: Path) -> Pki:
    return make_pki(shared_dir)
