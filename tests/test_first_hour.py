"""What a new user meets first: the version, one-line errors for a missing extra, the run command's
set-up, the licence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_config_show_is_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    import json

    cfg = tmp_path / "cam.toml"
    cfg.write_text('[mqtt]\nurl = "mqtt://127.0.0.1:1883"\nusername = "fg"\npassword = "${MQ_PW}"\n'
                   f'[models.m]\ntype = "yolo"\nweights = "{ROOT}/models/shapes-yolo11n.pt"\n'
                   '[streams.door]\nurl = "rtsp://viewer:Door-Secret-1@192.0.2.10/s"\nmodel = "m"\n')
    (tmp_path / "cam.overlay.json").write_text(json.dumps({"v": 1, "streams": {"door": {"patch": {"max_fps": 3}}}}))
    out = framegrid("config", "show", str(cfg), env={**os.environ, "MQ_PW": "Mq-Secret-2"})
    assert out.returncode == 0, out.stderr
    assert "Door-Secret-1" not in out.stdout
    assert "Mq-Secret-2" not in out.stdout
    shown = json.loads(out.stdout)
    assert shown["streams"]["door"]["max_fps"] == 3  # the overlay applied
    assert shown["models"]["m"]["imgsz"] == 640  # defaults filled in
    assert shown["streams"]["door"]["url"].startswith("rtsp://viewer:")
    schema = json.loads(framegrid("config", "schema").stdout)
    assert "streams" in schema["properties"]


def test_a_start_up_line_says_when_the_overlay_changes_the_streams(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging

    from pipeline.cli import _say_overlay

    cfg = tmp_path / "cam.toml"
    _say_overlay(cfg)
    assert not caplog.records
    (tmp_path / "cam.overlay.json").write_text(json.dumps({"v": 1, "streams": {
        "door": {"patch": {"max_fps": 3}}, "yard": {"config": {"url": "x.mp4", "model": "m"}}, "old": None}}))
    with caplog.at_level(logging.WARNING):
        _say_overlay(cfg)
    line = caplog.records[-1].getMessage()
    assert line.startswith("cam.overlay.json overrides cam.toml's streams"), line
    assert "added or replaced yard" in line
    assert "changed door (max_fps)" in line
    assert "removed old" in line


def test_progress_is_plain_lines_when_not_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import _progress_bar

    progress = _progress_bar("faces")
    for done in range(1, 101):
        progress(done, 100)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == ["faces: 1/100"] + [f"faces: {n}/100" for n in range(10, 101, 10)]


def test_devices_and_probe_speak_json(tmp_path: Path) -> None:
    import json

    devices = json.loads(framegrid("devices", "--json", str(ROOT / "config.toml")).stdout)
    assert devices["devices"][-1]["id"] == "cpu"
    assert devices["models"]["shapes"].startswith(f"{sum(r['slots'] for r in devices['detect_slots'])} slot(s)")
    probe = json.loads(framegrid("probe", "--json", str(ROOT / "media" / "demo-shapes.mp4")).stdout)
    assert (probe["codec"], probe["width"], probe["height"]) == ("h264", 640, 360)


def test_the_readme_talking_head_command_runs_as_written(tmp_path: Path, face_image: Path) -> None:
    """The README's talking-head line, taken from the README and run with a face photo and a WAV file
    named as it names them: a video comes out, and its progress is plain lines (no carriage return)."""
    import shlex
    import shutil

    from tests.support.media import probe_output, tone_on_off, write_wav

    line = next(s.strip() for s in (ROOT / "README.md").read_text().splitlines() if " talk " in s and "framegrid" in s)
    argv = shlex.split(line)
    assert argv[0] == ".venv/bin/framegrid", line
    shutil.copy(face_image, tmp_path / "face.jpg")
    write_wav(tmp_path / "hello.wav", tone_on_off([(6.0, True), (6.0, False)]), 16000)
    out = framegrid(*argv[1:], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr
    assert "talk: 10 s rendered" in out.stderr.splitlines()
    frames, fps, audio_s, _ = probe_output(tmp_path / "hello.mp4")
    assert fps == pytest.approx(25, abs=0.5)
    assert frames == pytest.approx(300, abs=2)
    assert audio_s == pytest.approx(12, abs=0.2)
