"""The documentation stays true: the site builds strictly, the configuration reference is what the
config models say, every default lives in the config models, and the README fits on a screen."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tests.support.procs import ROOT
from tools import api_reference, config_reference

PRODUCT = ("streams", "detectors", "talkinghead", "pipeline")


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """No broken link, no page outside the navigation, no warning of any kind."""
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "config-reference" / "index.html").is_file()


def test_the_config_reference_is_generated_from_the_models() -> None:
    committed = (ROOT / "docs" / "config-reference.md").read_text()
    assert committed == config_reference.render(), "run: .venv/bin/python -m tools.config_reference"
    for key in ("`streams.<name>.max_fps`", "`lipsync.batch_size`", "`webrtc.max_viewers`", "`events.max_queue`"):
        assert key in committed, key


def test_the_api_reference_is_generated_from_the_openapi_schema() -> None:
    committed = (ROOT / "docs" / "api-reference.md").read_text()
    assert committed == api_reference.render(api_reference.openapi()), "run: .venv/bin/python -m tools.api_reference"
    for route in ("`GET /api/streams`", "`POST /api/talk/sessions`", "`GET /api/streams/{name}/mjpeg`"):
        assert route in committed, route


def config_defaults() -> dict[str, set[str]]:
    """Every config key name -> the reprs of its non-trivial literal defaults, over every model
    reachable from `Config`."""
    from pipeline.config import Config

    seen: set[type[BaseModel]] = set()
    todo: list[type[BaseModel]] = [Config]
    out: dict[str, set[str]] = {}
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            stack: list[Any] = [field.annotation]
            while stack:
                t = stack.pop()
                stack.extend(getattr(t, "__args__", ()))
                if isinstance(t, type) and issubclass(t, BaseModel):
                    todo.append(t)
            d = field.default
            if d is not PydanticUndefined and d not in (None, True, False, "", 0) and isinstance(d, int | float | str):
                out.setdefault(name, set()).add(repr(d))
    return out


def literal_defaults(path: Path) -> list[tuple[int, str, str]]:
    """(line, name, repr) of every literal default of a parameter or class field in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        pairs: list[tuple[str, ast.expr]] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            positional = a.posonlyargs + a.args
            pairs += [(p.arg, d) for p, d in zip(positional[len(positional) - len(a.defaults):], a.defaults,
                                                 strict=True)]
            pairs += [(p.arg, d) for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None]
        elif isinstance(node, ast.ClassDef):
            pairs += [(b.target.id, b.value) for b in node.body
                      if isinstance(b, ast.AnnAssign) and b.value is not None and isinstance(b.target, ast.Name)]
        for name, value in pairs:
            try:
                found.append((value.lineno, name, repr(ast.literal_eval(value))))
            except ValueError:
                continue  # not a literal: a name (the home of the value) or a call
    return found


def test_every_config_default_lives_in_the_config_models() -> None:
    """A parameter or field named like a config key must not repeat that key's default as a literal:
    it takes it from `pipeline.config` (or from the published-defaults module the config adopts)."""
    defaults = config_defaults()
    home = ROOT / "pipeline" / "config.py"
    repeated = [f"{path.relative_to(ROOT)}:{line}: {name}={value}"
                for pkg in PRODUCT for path in sorted((ROOT / pkg).rglob("*.py")) if path != home
                for line, name, value in literal_defaults(path) if value in defaults.get(name, ())]
    assert not repeated, "defaults declared outside the config models:\n" + "\n".join(repeated)


def test_the_defaults_check_finds_a_repeated_default(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def plan(usable_fraction: float = 0.9, other: int = 3) -> None: ...\n")
    assert "0.9" in config_defaults()["usable_fraction"]
    assert (1, "usable_fraction", "0.9") in literal_defaults(probe)


def test_the_readme_fits_on_a_screen_and_opens_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, len(lines)
    fence = lines.index("```bash")
    assert lines[fence + 1].startswith("tools/run ")
    assert lines[fence + 2].startswith("tools/test ")
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("tools/test")
    assert (ROOT / "docs" / "img" / "page.png").stat().st_size > 10_000  # the page, made by tools/screenshot.py
