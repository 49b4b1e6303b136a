"""Config validation: strict keys, key paths in every error, env placeholders, file checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import ConfigError, load_config
from pipeline.cli import main
from tests.support.procs import MODEL, ROOT


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


GOOD = f"""
[mqtt]
url = "mqtt://127.0.0.1:1883"
[models.m]
type = "yolo"
weights = "{MODEL}"
imgsz = 320
[streams.cam1]
url = "rtsp://user:${{CAM_PW}}@127.0.0.1:8554/cam1"
model = "m"
max_fps = 10
"""


def test_default_config_is_valid() -> None:
    cfg = load_config(ROOT / "config.toml")
    assert cfg.mqtt.url == "embedded"
    assert cfg.models["shapes"].weights == ROOT / "models" / "shapes-yolo11n.pt"
    assert cfg.streams["demo"].url == str(ROOT / "media" / "demo-shapes.mp4")


def test_env_placeholder_substituted(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), env={"CAM_PW": "hunter2"})
    assert cfg.streams["cam1"].url == "rtsp://user:hunter2@127.0.0.1:8554/cam1"
    assert "hunter2" in cfg.secrets()


def test_missing_env_variable_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD), env={})
    assert ("streams.cam1.url", "environment variable CAM_PW is not set") in info.value.errors


def test_wrong_types_and_unknown_keys_all_reported_with_paths(tmp_path: Path) -> None:
    text = GOOD.replace("max_fps = 10", 'max_fps = "fast"\nframerate = 3').replace("imgsz = 320", "imgsz = 0")
    text += '\n[bogus]\nx = 1\n[mqtt.extra]\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={"CAM_PW": "pw"})
    paths = dict(info.value.errors)
    assert "unknown key" in paths["streams.cam1.framerate"]
    assert "number" in paths["streams.cam1.max_fps"]
    assert "greater than or equal to 32" in paths["models.m.imgsz"]
    assert paths["bogus"] == "unknown key"
    assert paths["mqtt.extra"] == "unknown key"


def test_unknown_model_reference(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD.replace('model = "m"', 'model = "nope"')), env={"CAM_PW": "x"})
    assert info.value.errors[0][0] == "streams.cam1.model"
    assert "unknown model 'nope'" in info.value.errors[0][1]


def test_missing_weights_says_what_to_download(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD.replace(str(MODEL), "weights/yolo11n.pt")), env={"CAM_PW": "x"})
    key, msg = info.value.errors[0]
    assert key == "models.m.weights"
    assert str(tmp_path / "weights" / "yolo11n.pt") in msg
    assert "Download" in msg
    assert "yolo11n.pt" in msg


def test_a_piper_voice_is_found_beside_the_config_or_named_with_what_to_download(tmp_path: Path) -> None:
    from tools.make_tiny_piper import make

    make(tmp_path / "voices", "tiny")
    cfg = load_config(write(tmp_path, GOOD + '\n[tts]\nvoice = "tiny"\npiper = {tiny = "voices/tiny.onnx"}\n'),
                      env={"CAM_PW": "x"})
    assert cfg.tts.piper == {"tiny": tmp_path / "voices" / "tiny.onnx"}
    assert cfg.tts.speech().piper["tiny"].is_file()
    for table in ('[tts]\npiper = {lessac = "voices/en_US-lessac-medium.onnx"}\n',
                  '[tts]\nspeed = 0\npiper = {lessac = "voices/en_US-lessac-medium.onnx"}\n'):  # raw tables too
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, GOOD + "\n" + table), env={"CAM_PW": "x"})
        errors = dict(info.value.errors)
        assert "en_US-lessac-medium.onnx.json" in errors["tts.piper.lessac"]
        assert "piper-voices" in errors["tts.piper.lessac"]


def test_continuous_recording_without_the_recorder_is_refused(tmp_path: Path) -> None:
    text = GOOD + "\n[streams.cam1.record]\ncontinuous = true\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={"CAM_PW": "x"})
    errors = dict(info.value.errors)
    assert "enabled = true" in errors["streams.cam1.record"], errors


def test_bad_mqtt_url_and_bad_stream_name(tmp_path: Path) -> None:
    text = GOOD.replace("mqtt://127.0.0.1:1883", "http://broker") + '\n[streams."bad name"]\nurl="x"\nmodel="m"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={"CAM_PW": "x"})
    keys = [k for k, _ in info.value.errors]
    assert "mqtt.url" in keys
    assert any(k.startswith("streams.bad name") for k in keys)


def test_password_never_in_errors(tmp_path: Path) -> None:
    text = GOOD.replace("max_fps = 10", "max_fps = -1").replace("${CAM_PW}", "t0p-secret")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text.replace('url = "rtsp', 'url = 5\nx = "rtsp')))
    assert "t0p-secret" not in str(info.value)


def test_cli_validate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "config.toml")]) == 0
    bad = write(tmp_path, GOOD.replace("max_fps = 10", "max_fps = 0\nspeed = 1"))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "streams.cam1.max_fps:" in err
    assert "streams.cam1.speed: unknown key" in err
    assert main(["validate", str(tmp_path / "absent.toml")]) == 2
    (tmp_path / "broken.toml").write_text("[mqtt\nurl=")
    assert main(["validate", str(tmp_path / "broken.toml")]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_every_stage_reports_at_once(tmp_path: Path) -> None:
    """A typo, a bad value, an unknown model and missing files in one file: one run names them all."""
    from pipeline.config import ConfigError, load_config

    cfg = tmp_path / "bad.toml"
    cfg.write_text('[models.m]\ntype = "yolo"\nweights = "nope.pt"\n'
                   '[streams.a]\nurl = "missing.mp4"\nmodel = "ghost"\nmax_fps = 0\ntypo_key = 1\n'
                   '[lipsync]\nweights = "musetalk"\n'
                   '[talk.t]\navatar = "face.jpg"\naudio = "hello.wav"\nout = "o.mp4"\nbackend = "musetalk"\n')
    (tmp_path / "musetalk").mkdir()  # a folder, but not in MuseTalk's layout
    with pytest.raises(ConfigError) as caught:
        load_config(cfg)
    keys = {key for key, _ in caught.value.errors}
    assert keys == {"streams.a.max_fps", "streams.a.typo_key", "streams.a.model", "models.m.weights",
                    "streams.a.url", "talk.t.avatar", "talk.t.audio", "lipsync.weights"}, caught.value.errors
    # the same file checks on a config that is otherwise valid: the same keys and messages
    cfg.write_text('[models.m]\ntype = "yolo"\nweights = "nope.pt"\n'
                   '[streams.a]\nurl = "missing.mp4"\nmodel = "m"\n'
                   '[lipsync]\nweights = "musetalk"\n'
                   '[talk.t]\navatar = "face.jpg"\naudio = "hello.wav"\nout = "o.mp4"\nbackend = "musetalk"\n')
    with pytest.raises(ConfigError) as valid:
        load_config(cfg)
    raw = {k: m for k, m in caught.value.errors if k in dict(valid.value.errors)}
    assert raw == dict(valid.value.errors), valid.value.errors


def test_stream_defaults_apply_to_every_stream_and_to_api_additions(tmp_path: Path) -> None:
    """`[stream_defaults]`: 32 cameras need not repeat a key; a stream's own keys win, tables merge
    key by key, and a stream added through the API gets them too."""
    from types import SimpleNamespace

    from pipeline.api.control import StreamControl

    cameras = "".join(f'[streams.cam{i}]\nurl = "rtsp://127.0.0.1:8554/cam{i}"\n' for i in range(32))
    cfg = load_config(write(tmp_path, f"""
[models.m]
type = "yolo"
weights = "{MODEL}"
[stream_defaults]
model = "m"
max_fps = 5
skip_frames = "nonkey"
tracker = {{ type = "bytetrack", buffer_s = 3.0 }}
zones.door = {{ polygon = [[0, 0], [0.5, 0], [0.5, 1], [0, 1]] }}
{cameras}
[streams.cam31.tracker]
buffer_s = 9.0
[streams.cam31.zones.gate]
polygon = [[0.5, 0], [1, 0], [1, 1], [0.5, 1]]
"""))
    assert len(cfg.streams) == 32
    assert {s.model for s in cfg.streams.values()} == {"m"}
    assert {s.max_fps for s in cfg.streams.values()} == {5}
    assert cfg.streams["cam0"].skip_frames == "nonkey"
    assert cfg.streams["cam0"].tracker is not None
    assert cfg.streams["cam0"].tracker.buffer_s == 3.0
    own = cfg.streams["cam31"]
    assert own.tracker is not None
    assert (own.tracker.type, own.tracker.buffer_s) == ("bytetrack", 9.0)  # merged: its own buffer, the default type
    assert set(own.zones) == {"door", "gate"}
    control = StreamControl(SimpleNamespace(config=cfg, model_names=lambda: ["m"]), None)  # type: ignore[arg-type]
    added = control.validate({"url": "rtsp://127.0.0.1:8554/new"}, from_client=False)
    assert (added.model, added.max_fps, added.skip_frames) == ("m", 5, "nonkey")


def test_stream_defaults_errors_are_named_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"""
[models.m]
type = "yolo"
weights = "{MODEL}"
[stream_defaults]
url = "rtsp://127.0.0.1/x"
max_fps = -1
typo_key = 1
model = "m"
[streams.a]
url = "rtsp://127.0.0.1:8554/a"
[streams.b]
url = "rtsp://127.0.0.1:8554/b"
"""))
    assert sorted(caught.value.errors) == [
        ("stream_defaults.max_fps", "Input should be greater than 0 (got -1)"),
        ("stream_defaults.typo_key", "unknown key"),
        ("stream_defaults.url", "not a default: each stream names its own url"),
    ]
