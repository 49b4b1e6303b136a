"""Write the HTTP API reference of the docs from the OpenAPI schema of the app framegrid serves:

    .venv/bin/python -m tools.api_reference [--out docs/api-reference.md]

The app is built over a pipeline made from the default config (nothing is started). `tests/test_docs.py`
fails when the committed page differs from what this prints.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from pipeline.api.app import build_app
from pipeline.api.control import StreamControl
from pipeline.app import Pipeline
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "api-reference.md"

HEADER = """# HTTP API reference

Every route of the API, generated from its OpenAPI schema by `python -m tools.api_reference` (a test
keeps this page equal to its output). A running framegrid serves the same schema at
`/openapi.json` and browsable at `/docs`. With `api.token` set, every route but `/api/health` and
`/api/ready` wants `Authorization: Bearer <token>`; errors answer `{"detail": ...}` with the status
below. See [HTTP API and the web page](http-api.md) for examples, and
[Scaling out](scaling-out.md) for what a cluster head serves.
"""


def _schema_name(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return f"`{schema['$ref'].rsplit('/', 1)[-1]}`"
    if schema.get("type") == "array" and "items" in schema:
        return f"list of {_schema_name(schema['items'])}"
    if "anyOf" in schema:
        return " or ".join(_schema_name(s) for s in schema["anyOf"])
    return str(schema.get("type", "object"))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def render(schema: dict[str, Any]) -> str:
    parts = [HEADER]
    by_tag: dict[str, list[str]] = {}
    for path, methods in sorted(schema["paths"].items()):
        for method, op in methods.items():
            tag = (op.get("tags") or ["other"])[0]
            params = [f"`{p['name']}` ({p['in']}{', required' if p.get('required') else ''})"
                      + (f": {_cell(p['description'])}" if p.get("description") else "")
                      for p in op.get("parameters", [])]
            body = op.get("requestBody", {}).get("content", {})
            if body:
                kind, media = next(iter(body.items()))
                params.append(f"body `{kind}`" + (f": {_schema_name(media['schema'])}" if "schema" in media else ""))
            answers = []
            for code, resp in sorted(op.get("responses", {}).items()):
                content = resp.get("content", {})
                what = ", ".join(f"`{k}`" if "schema" not in v or k != "application/json"
                                 else _schema_name(v["schema"]) for k, v in content.items())
                answers.append(f"{code}" + (f" {what}" if what else ""))
            summary = op.get("summary") or op.get("description", "").split("\n")[0]
            by_tag.setdefault(tag, []).append(
                f"| `{method.upper()} {path}` | {_cell(summary)} | {'<br>'.join(params) or '-'} | "
                f"{', '.join(answers)} |")
    for tag in sorted(by_tag):
        parts.append(f"\n## {tag}\n\n| route | what | parameters | answers |\n|---|---|---|---|\n"
                     + "\n".join(by_tag[tag]) + "\n")
    return "".join(parts)


def openapi() -> dict[str, Any]:
    config = load_config(ROOT / "config.toml", check_files=False)
    pipeline = Pipeline(config)
    app = build_app(pipeline, StreamControl(pipeline.running, None), None, None, config.api.mjpeg_fps, asyncio.Event())
    return app.openapi()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.write_text(render(openapi()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
