"""Optional packages behind the distribution's extras, imported with one clear line when absent.

`require("dlib", "talk", "face landmarks")` returns the module, or raises `MissingExtra` whose
message names the `pip install` to run; the CLI prints it as one line (never a traceback).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional package a feature needs is not installed."""

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(f"{purpose} needs the '{extra}' extra (missing module {module}): "
                         f"pip install 'framegrid[{extra}]'")
        self.module, self.extra, self.purpose = module, extra, purpose


def require(module: str, extra: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(module, extra, purpose) from exc
