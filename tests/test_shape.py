"""The shape of the code, checked: imports run one way (no circles), every default lives in the
config models, and no product class or function outgrows what a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.procs import ROOT

PACKAGES = ("streams", "detectors", "talkinghead", "pipeline")
# lowest first: a module may import its own layer or a lower one, never a higher one
LAYERS: list[tuple[str, ...]] = [
    ("streams",),
    ("detectors",),
    ("talkinghead",),
    ("pipeline.errors", "pipeline.topics", "pipeline.payloads", "pipeline.overlay", "pipeline.clientpaths",
     "pipeline.config",
     "pipeline.logs"),
    ("pipeline.core",),
    ("pipeline.mqtt",),
    ("pipeline.analytics",),
    ("pipeline.talk",),
    ("pipeline.app",),
    ("pipeline.api",),
    ("pipeline.cluster",),
    ("pipeline.cli",),
    ("pipeline",),  # the package's public face re-exports from below
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, depth = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    assert best >= 0, f"{module} is in no layer: add it to LAYERS"
    return best


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(path: Path) -> set[str]:
    """Every module `path` imports when it runs (at import or inside a function), resolved to our
    packages; imports only for type checkers are left out."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.add(target)
                found.update(f"{target}.{a.name}" for a in child.names)  # `from pkg import module`
            visit(child)

    visit(ast.parse(path.read_text()))
    modules = {module_name(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {m for m in found if m in modules and m != me}


def graph() -> dict[str, set[str]]:
    return {module_name(p): runtime_imports(p) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def test_imports_run_one_way() -> None:
    wrong = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
             for m, targets in graph().items() for t in sorted(targets)
             if layer_of(t) > layer_of(m) and not m.startswith(t + ".")]  # a package's own __init__ is fine
    assert not wrong, "imports that run upwards:\n" + "\n".join(wrong)


def test_no_import_circles() -> None:
    g = graph()
    # a package imports its own modules through its __init__; a module importing its package is that
    # package's __init__ running first, not a circle of ours
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in g.items()}
    seen: dict[str, int] = {}  # 1: on the path, 2: done
    circles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if seen.get(nxt) == 1:
                circles.append([*path[path.index(nxt):], nxt])
            elif nxt not in seen:
                walk(nxt, [*path, nxt])
        seen[node] = 2

    for start in sorted(edges):
        if start not in seen:
            walk(start, [start])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_layer_check_would_catch_an_upward_import(tmp_path: Path) -> None:
    """The checks above are not vacuous: an upward import in a module of the lowest layer is found."""
    assert layer_of("pipeline.core.slots") < layer_of("pipeline.api.app")
    assert layer_of("pipeline.core.slots") > layer_of("pipeline.config")
    assert "streams.handoff" in graph()["pipeline.core.slots"]
    fake = ROOT / "streams" / "_shape_probe.py"
    fake.write_text("def f():\n    from pipeline.core import slots\n")
    try:
        upward = runtime_imports(fake)
    finally:
        fake.unlink()
    assert "pipeline.core.slots" in upward


# -- sizes ---------------------------------------------------------------------------------------------
MAX_PUBLIC_METHODS = 20
MAX_FUNCTION_LINES = 80


def _product_files() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def own_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines without the functions and classes defined inside it (each of those is
    measured on its own: a FastAPI app's builder holds its route handlers, a factory its classes)."""
    nested = 0

    def visit(n: ast.AST) -> None:
        nonlocal nested
        for child in ast.iter_child_nodes(n):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                start = child.decorator_list[0].lineno if child.decorator_list else child.lineno
                nested += (child.end_lineno or child.lineno) - start + 1
            else:
                visit(child)

    visit(node)
    return (node.end_lineno or node.lineno) - node.lineno + 1 - nested


def test_no_class_or_function_outgrows_a_reader() -> None:
    big: list[str] = []
    for path in _product_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                public = [n.name for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                          and not n.name.startswith("_")]
                if len(public) > MAX_PUBLIC_METHODS:
                    big.append(f"{module_name(path)}.{node.name}: {len(public)} public methods")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and own_lines(node) > MAX_FUNCTION_LINES:
                big.append(f"{module_name(path)}.{node.name}: {own_lines(node)} lines")
    assert not big, "\n".join(big)


def test_the_size_check_measures_nested_definitions_apart() -> None:
    tree = ast.parse("def outer():\n    x = 1\n    def inner():\n        return 2\n    return inner\n")
    outer = tree.body[0]
    assert isinstance(outer, ast.FunctionDef)
    assert own_lines(outer) == 3  # def, x = 1, return inner
