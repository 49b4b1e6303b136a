"""Property tests of the config reader: any TOML document, any values, gives a valid Config or a
ConfigError that names key paths; never another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

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


KEYS = sorted(k for k in _vocabulary(Config, set()) if k[0].islower()) + ["cam", "shapes", "x", "", "a.b", "ü"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["embedded", "mqtt://h:1883", "mqtts://u:p@h", "rtsp://u:p@cam/x", "${NOPE}", "${HOME:-x}",
                     "demo.mp4", "yolo", "bytetrack", "ray", "local", "127.0.0.1:0", "0.0.0.0:8080", "auto", "-1"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=25)
DOCUMENTS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6)
FIELDS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6)
# documents shaped like real configs: known sections, named models and streams, random fields in them
STRUCTURED = st.fixed_dictionaries({}, optional={
    "mqtt": FIELDS, "pipeline": FIELDS, "api": FIELDS, "events": FIELDS, "cluster": FIELDS, "devices": FIELDS,
    "models": st.dictionaries(st.sampled_from(["shapes", "m2", "bad name"]),
                              st.fixed_dictionaries({"type": st.just("yolo"), "weights": st.just("w.pt")}, optional={
                                  "imgsz": VALUES, "tracker": FIELDS, "backend": VALUES, "slots": VALUES}), max_size=2),
    "streams": st.dictionaries(st.sampled_from(["cam", "cam2", "x y"]), st.fixed_dictionaries(
        {"url": SCALARS, "model": st.sampled_from(["shapes", "nope"])},
        optional={"max_fps": VALUES, "zones": st.dictionaries(st.sampled_from(["z", "q"]), FIELDS, max_size=2),
                  "lines": st.dictionaries(st.just("l"), FIELDS, max_size=1), "tracker": FIELDS}), max_size=2),
})


def _check(run: Any) -> None:
    try:
        config = run()
    except ConfigError as exc:
        assert exc.errors, "a ConfigError with no error in it"
        for path, message in exc.errors:
            assert isinstance(path, str) and isinstance(message, str) and message
        assert str(exc)
    else:
        assert isinstance(config, Config)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENTS)
def test_any_document_is_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    _check(lambda: parse_config(data, Path("/nonexistent-base"), check_files=False))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STRUCTURED)
def test_any_config_shaped_document_is_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    _check(lambda: parse_config(data, Path("/nonexistent-base"), check_files=False))


def test_the_shaped_documents_include_valid_configs_with_streams() -> None:
    """The generator reaches deep validation: it can make a valid config with a stream."""
    from hypothesis import find

    def valid_with_stream(data: dict[str, Any]) -> bool:
        try:
            return bool(parse_config(data, Path("/nonexistent-base"), check_files=False).streams)
        except ConfigError:
            return False

    assert find(STRUCTURED, valid_with_stream, settings=settings(max_examples=2000, database=None))["streams"]


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
