"""What a new user meets first: the version, one-line errors for a missing extra, the run command's
set-up, the licence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.procs import ROOT


def framegrid(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def test_version() -> None:
    from importlib.metadata import version

    out = framegrid("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"framegrid {version('framegrid')}"


def without(tmp_path: Path, *modules: str) -> dict[str, str]:
    """An environment in which `modules` cannot be imported, as in a venv without their extra."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    # a fresh state folder: a cached avatar would not need the face finder at all
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "FRAMEGRID_STATE_DIR": str(tmp_path / "state")}


def test_talk_without_the_talk_extra_says_what_to_install_in_one_line(tmp_path: Path, face_image: Path) -> None:
    from tests.support.media import tone_on_off, write_wav

    wav = write_wav(tmp_path / "a.wav", tone_on_off([(0.5, True)]), 16000)
    out = framegrid("talk", "--avatar", str(face_image), "--audio", str(wav), "--out", str(tmp_path / "o.mp4"),
                    env=without(tmp_path, "dlib"))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr, out.stderr
    assert lines[-1] == ("framegrid talk: finding a face (avatar landmarks) needs the 'talk' extra "
                         "(missing module dlib): pip install 'framegrid[talk]'"), out.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_the_run_command_installs_every_default_feature() -> None:
    """tools/run sets up the extras the default features need (talking heads and WebRTC included) and
    limits malloc arenas, like the container images."""
    bootstrap = (ROOT / "tools" / "bootstrap").read_text()
    run_extras = next(line for line in bootstrap.splitlines() if line.startswith('extras="['))
    for extra in ("cpu", "talk", "webrtc"):
        assert extra in run_extras, run_extras
    assert "MALLOC_ARENA_MAX" in (ROOT / "tools" / "run").read_text()
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        assert "MALLOC_ARENA_MAX=2" in (ROOT / "deploy" / dockerfile).read_text(), dockerfile


def test_licence_files() -> None:
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence
    assert "Version 2.0" in licence
    assert "AGPL-3.0" in (ROOT / "README.md").read_text()
