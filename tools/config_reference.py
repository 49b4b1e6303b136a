"""Write the configuration reference of the docs from the pydantic models (the one home of every key,
default and description):

    .venv/bin/python -m tools.config_reference [--out docs/config-reference.md]

`tests/test_docs.py` fails when the committed page differs from what this prints.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.config import Config

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "config-reference.md"

HEADER = """# Configuration reference

Every key of the TOML file, with its default and what it means, generated from the config models
by `python -m tools.config_reference` (a test keeps this page equal to its output). `<name>` stands
for a name you choose (`[streams.front_door]`). A key left out takes its default; an unknown key
is an error. See [Configuration](configuration.md) for the file's rules and an example.
"""


def _models_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the model type inside an annotation, whether it is a dict of them)."""
    origin = typing.get_origin(annotation)
    if origin in (dict, typing.Dict):  # noqa: UP006 - matching either spelling
        value = typing.get_args(annotation)[1]
        inner, _ = _models_in(value)
        return inner, inner is not None
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            inner, is_dict = _models_in(arg)
            if inner is not None:
                return inner, is_dict
        return None, False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _type_name(annotation: Any) -> str:
    if annotation is SecretStr:
        return "secret string"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (list, tuple, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation) if a is not Ellipsis)
        return f"{origin.__name__}[{args}]" if args else origin.__name__
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation)).replace("Path", "path")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(table)"
        return f"`{json.dumps(value)}`" if value not in ({}, []) else "empty"
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "none"
    if isinstance(field.default, SecretStr):
        return "(secret)"
    value = field.default
    if isinstance(value, Path):
        value = str(value)
    return f"`{json.dumps(value) if isinstance(value, str | bool) else value}`"


def _bounds(field: FieldInfo) -> str:
    out = []
    for m in field.metadata:
        for cls, sign in ((Ge, ">="), (Gt, ">"), (Le, "<="), (Lt, "<")):
            if isinstance(m, cls):
                out.append(f"{sign} {getattr(m, next(iter(m.__dataclass_fields__)))}")
        if isinstance(m, MinLen):
            out.append(f"length >= {m.min_length}")
        if isinstance(m, MaxLen):
            out.append(f"length <= {m.max_length}")
        pattern = getattr(m, "pattern", None)
        if pattern:
            out.append(f"matches `{pattern}`")
    return ", ".join(out)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def rows(model: type[BaseModel], prefix: str) -> tuple[list[str], list[tuple[str, type[BaseModel]]]]:
    """The table rows of `model`'s own keys, and its sub-tables (key path, model)."""
    out, subs = [], []
    for name, field in model.model_fields.items():
        inner, is_dict = _models_in(field.annotation)
        key = f"{prefix}{name}"
        if inner is not None and not is_dict and _default(field) == "(table)":
            subs.append((key, inner))
            continue
        if inner is not None and is_dict:
            subs.append((f"{key}.<name>", inner))
            continue
        kind = _type_name(field.annotation)
        if inner is not None:  # an optional sub-table (a stream's own tracker): listed, and its keys below
            subs.append((key, inner))
            kind = "table or none"
        bounds = _bounds(field)
        desc = (field.description or "").strip()
        out.append(f"| `{key}` | {_cell(kind)} | {_default(field)} | {_cell(desc)}"
                   f"{' (' + _cell(bounds) + ')' if bounds else ''} |")
    return out, subs


def render() -> str:
    parts = [HEADER]
    todo: list[tuple[str, type[BaseModel]]] = [("", Config)]
    while todo:
        key, model = todo.pop(0)
        own, subs = rows(model, f"{key}." if key else "")
        todo[0:0] = subs
        if own:
            title = f"`[{key}]`" if key else "Top level"
            doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            doc = f"{doc}\n\n" if doc and "A pydantic model" not in doc and "Usage docs" not in doc else ""
            parts.append(f"\n## {title}\n\n{doc}| key | type | default | meaning |\n|---|---|---|---|\n"
                         + "\n".join(own) + "\n")
    return "".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.write_text(render())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
