"""Where framegrid keeps state on disk when the config does not say: one home for every package
(model exports, ultralytics' settings, avatar caches, events, talk jobs)."""

from __future__ import annotations

import os
from pathlib import Path


def default_state_dir() -> Path:
    """$FRAMEGRID_STATE_DIR, else `framegrid` under $XDG_CACHE_HOME (default `~/.cache`)."""
    env = os.environ.get("FRAMEGRID_STATE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "framegrid"
