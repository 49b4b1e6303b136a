"""What the pipeline runs now: the config's enabled models and streams, plus runtime changes.

The validated `Config` stays as it was read (frozen); models and streams added or removed while
running change this registry only.
"""

from __future__ import annotations

import re

from pipeline.config import NAME_PATTERN, Config, ModelConfig, StreamConfig


class Registry:
    def __init__(self, config: Config) -> None:
        self.models: dict[str, ModelConfig] = dict(config.models)
        self.streams: dict[str, StreamConfig] = {n: s for n, s in config.streams.items() if s.enabled}

    @staticmethod
    def check_name(kind: str, name: str) -> None:
        if not re.match(NAME_PATTERN, name):
            raise ValueError(f"{kind} name {name!r} must match {NAME_PATTERN}")

    def add_model(self, name: str, cfg: ModelConfig) -> None:
        self.check_name("model", name)
        if name in self.models:
            raise ValueError(f"model {name} already exists")
        self.models[name] = cfg

    def remove_model(self, name: str) -> ModelConfig:
        if name not in self.models:
            raise KeyError(f"no model {name}")
        users = sorted(n for n, s in self.streams.items() if s.model == name)
        if users:
            raise ValueError(f"model {name} still serves stream(s) {', '.join(users)}: remove them first")
        return self.models.pop(name)

    def add_stream(self, name: str, cfg: StreamConfig) -> None:
        self.check_name("stream", name)
        if name in self.streams:
            raise ValueError(f"stream {name} already exists")
        if cfg.model not in self.models:
            raise ValueError(f"stream {name}: unknown model '{cfg.model}'")
        self.streams[name] = cfg

    def remove_stream(self, name: str) -> StreamConfig:
        if name not in self.streams:
            raise KeyError(f"no stream {name}")
        return self.streams.pop(name)

    def models_in_use(self) -> list[str]:
        return sorted({s.model for s in self.streams.values()})
