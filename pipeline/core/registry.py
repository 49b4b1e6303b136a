"""The streams the pipeline runs now: the config's enabled streams, plus runtime changes.

The validated `Config` stays as it was read (frozen); streams added or removed while running
change this registry only. The models' table is `pipeline.core.models.Models`.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from pipeline.config import NAME_PATTERN, Config, StreamConfig


class Registry:
    def __init__(self, config: Config) -> None:
        self.streams: dict[str, StreamConfig] = {n: s for n, s in config.streams.items() if s.enabled}

    @staticmethod
    def check_name(kind: str, name: str) -> None:
        if not re.match(NAME_PATTERN, name):
            raise ValueError(f"{kind} name {name!r} must match {NAME_PATTERN}")

    def add_stream(self, name: str, cfg: StreamConfig, models: Collection[str]) -> None:
        self.check_name("stream", name)
        if name in self.streams:
            raise ValueError(f"stream {name} already exists")
        if cfg.model not in models:
            raise ValueError(f"stream {name}: unknown model '{cfg.model}'")
        self.streams[name] = cfg

    def remove_stream(self, name: str) -> StreamConfig:
        if name not in self.streams:
            raise KeyError(f"no stream {name}")
        return self.streams.pop(name)

    def models_in_use(self) -> list[str]:
        return sorted({s.model for s in self.streams.values()})
