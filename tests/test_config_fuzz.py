"""Property tests of the config reader: any TOML document, any values, gives a valid Config or a
ConfigError that names key paths; never another exception."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pipeline.config import Config, ConfigError, load_config, parse_config


def _vocabulary(model: type[BaseModel], out: set[str]) -> set[str]:
    """Every field name of the config's models (so generated documents hit real keys, not only unknown ones)."""
    for name, field in model.model_fields.items():
        out.add(name)
        for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
            for inner in (arg, *getattr(arg, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel) and inner.__name__ not in out:
                    out.add(inner.__name__)
                    _vocabulary(inner, out)
    return out


KEYS = [*sorted(k for k in _vocabulary(Config, set()) if k[0].islower()), "cam", "shapes", "x", "", "a.b", "ü"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["embedded", "mqtt://h:1883", "mqtts://u:p@h", "rtsp://u:p@cam/x", "${NOPE}", "${HOME:-x}",
                     "demo.mp4", "yolo", "bytetrack", "ray", "local", "127.0.0.1:0", "0.0.0.0:8080", "auto", "-1"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=25)
DOCUMENTS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6)
BASE: dict[str, Any] = {
    "mqtt": {"url": "mqtt://127.0.0.1:1883"},
    "models": {"shapes": {"type": "yolo", "weights": "w.pt", "imgsz": 320}},
    "streams": {"cam": {"url": "rtsp://u:p@cam/x", "model": "shapes", "max_fps": 5,
                        "zones": {"z": {"polygon": [[0, 0], [1, 0], [1, 1]]}}}},
    "api": {"enabled": False},
}
SECTIONS = [("mqtt",), ("pipeline",), ("api",), ("events",), ("cluster",), ("devices",), ("lipsync",),
            ("models", "shapes"), ("models", "shapes", "tracker"), ("streams", "cam"), ("streams", "cam", "tracker"),
            ("streams", "cam", "zones", "z"), ("streams", "cam", "lines", "l"), ("streams", "cam2"), ("talk", "t")]


def _mutated(mutations: list[tuple[tuple[str, ...], str, Any]]) -> dict[str, Any]:
    import copy

    doc = copy.deepcopy(BASE)
    for section, key, value in mutations:
        node = doc
        for part in section:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[key] = value
    return doc


# documents shaped like real configs: a valid one with one to three keys set to generated values
STRUCTURED = st.lists(st.tuples(st.sampled_from(SECTIONS), st.sampled_from(KEYS), VALUES), min_size=1,
                      max_size=3).map(_mutated)


def _check(run: Any) -> None:
    # either a valid Config or a ConfigError listing (key path, message) pairs: never another exception
    try:
        outcome: Config | ConfigError = run()
    except ConfigError as exc:
        outcome = exc
    if isinstance(outcome, ConfigError):
        assert outcome.errors, "a ConfigError with no error in it"
        for path, message in outcome.errors:
            assert isinstance(path, str)
            assert isinstance(message, str)
            assert message
        assert str(outcome)
    else:
        assert isinstance(outcome, Config)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENTS)
def test_any_document_is_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    _check(lambda: parse_config(data, Path("/nonexistent-base"), check_files=False))


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(STRUCTURED)
def test_any_config_shaped_document_is_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    _check(lambda: parse_config(data, Path("/nonexistent-base"), check_files=False))


def test_the_shaped_documents_reach_deep_validation() -> None:
    """The mutations the property above generates reach the streams' own fields: one that keeps the
    config valid and one that breaks it deep inside, each as the generator would write it."""
    valid = _mutated([(("streams", "cam"), "max_fps", 12), (("streams", "cam", "tracker"), "min_hits", 3)])
    config = parse_config(valid, Path("/nonexistent-base"), check_files=False)
    assert config.streams["cam"].max_fps == 12
    assert config.streams["cam"].tracker is not None
    invalid = _mutated([(("streams", "cam", "zones", "z"), "anchor", "elbow")])
    with pytest.raises(ConfigError) as caught:
        parse_config(invalid, Path("/nonexistent-base"), check_files=False)
    assert any(path.startswith("streams.cam.zones.z.anchor") for path, _ in caught.value.errors), caught.value.errors
    assert {("streams", "cam"), ("streams", "cam", "zones", "z")} <= set(SECTIONS)
    assert "max_fps" in KEYS


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_any_text_as_a_config_file_is_a_config_or_a_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.toml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        _check(lambda: load_config(path, env={}))


def test_the_generator_reaches_real_sections() -> None:
    """The vocabulary holds the config's real keys, so the documents above are not all rejected at the top."""
    assert {"mqtt", "models", "streams", "tracker", "zones", "cluster", "max_fps", "url"} <= set(KEYS)
