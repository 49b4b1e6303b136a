"""Runtime changes to streams, validated like the TOML, persisted before they are applied.

`StreamControl` is what the HTTP API calls to add, change and delete streams. Each change:
validated by the same pydantic model as a `[streams.<name>]` table (errors name the key),
written to the overlay file (`pipeline.overlay`, atomic) so a crash or restart keeps it, then
applied to the running pipeline, touching only that stream (on a cluster: to the head, which
places it on a node). Changes run one at a time.

It keeps the configured streams (enabled or not, as the TOML + overlay say now); the pipeline's
ingest (the head's placement) keeps the running ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

from pipeline.clientpaths import ClientPathError, ClientPaths
from pipeline.config import NAME_PATTERN, StreamConfig, TalkConfig, _loc, merged, read_toml, resolve_stream
from pipeline.core.filters import FILTER_KEYS
from pipeline.errors import Conflict, Invalid, NotFound, Unavailable
from pipeline.overlay import OverlayError, overlay_path, read_overlay, read_talk_overlay, write_overlay
from streams import is_local_file
from streams.disk import disk_state

if TYPE_CHECKING:
    from pipeline.config import Config


class StreamTarget(Protocol):
    """What runs the streams: a pipeline's `RunningStreams`, or a cluster head placing them on nodes."""

    config: Config

    def model_names(self) -> Collection[str]: ...
    def is_running(self, name: str) -> bool: ...
    async def add_stream(self, name: str, cfg: StreamConfig) -> Any: ...
    async def remove_stream(self, name: str) -> None: ...
    def retune_stream(self, name: str, cfg: StreamConfig) -> bool: ...

log = logging.getLogger(__name__)

PATCHABLE = ("max_fps", "model", "enabled", *FILTER_KEYS)  # max_fps and the filters apply without a reconnect


def _invalid(exc: ValidationError) -> Invalid:
    errors = [(_loc(tuple(e["loc"])), "unknown key" if e["type"] == "extra_forbidden" else e["msg"])
              for e in exc.errors(include_url=False)]
    return Invalid("; ".join(f"{k}: {m}" for k, m in errors), errors)


class StreamControl:
    def __init__(self, runner: StreamTarget, config_path: Path | None) -> None:
        self.runner = runner
        self.config_path = config_path
        self.base_dir = config_path.resolve().parent if config_path is not None else Path.cwd()
        self.streams: dict[str, StreamConfig] = dict(runner.config.streams)  # configured, enabled or not
        self.paths = ClientPaths(runner.config.api.media_dirs or [self.base_dir], self.base_dir)
        self._lock = asyncio.Lock()

    @property
    def overlay_file(self) -> Path | None:
        return overlay_path(self.config_path) if self.config_path is not None else None

    # -- validation --------------------------------------------------------------------------------
    def validate(self, raw: dict[str, Any], from_client: bool = False) -> StreamConfig:
        """`from_client`: the URL came from an API client (network schemes, or files in api.media_dirs)."""
        try:  # [stream_defaults] under the client's keys, as for the TOML's streams
            cfg = StreamConfig.model_validate(merged(self.runner.config.stream_defaults, raw))
        except ValidationError as exc:
            raise _invalid(exc) from None
        if from_client:
            for key in ("url", "detect_url"):
                try:
                    if (url := getattr(cfg, key)) is not None:
                        self.paths.url(url)
                except ClientPathError as exc:
                    raise Invalid(f"{key}: {exc}", [(key, str(exc))]) from None
        cfg = resolve_stream(cfg, self.base_dir)
        models = self.runner.model_names()
        if cfg.model not in models:
            known = ", ".join(sorted(models)) or "none defined"
            raise Invalid(f"model: unknown model '{cfg.model}' (models: {known})",
                              [("model", f"unknown model '{cfg.model}' (models: {known})")])
        for key in ("url", "detect_url"):
            url = getattr(cfg, key)
            if cfg.enabled and url is not None and is_local_file(url) and not Path(url.removeprefix("file:")).exists():
                raise Invalid(f"{key}: file not found: {url}", [(key, f"file not found: {url}")])
        return cfg

    # -- changes -----------------------------------------------------------------------------------
    async def add(self, name: str, raw: dict[str, Any]) -> StreamConfig:
        import re

        if not re.match(NAME_PATTERN, name):
            raise Invalid(f"name: must match {NAME_PATTERN}", [("name", f"must match {NAME_PATTERN}")])
        async with self._lock:
            if name in self.streams:
                raise Conflict(f"stream {name} already exists")
            cfg = self.validate(raw, from_client=True)
            self._persist(name, {"config": raw})
            self.streams[name] = cfg
            if cfg.enabled:
                await self.runner.add_stream(name, cfg)
            log.info("stream %s: added through the API", name)
            return cfg

    async def patch(self, name: str, changes: dict[str, Any]) -> StreamConfig:
        async with self._lock:
            old = self.streams.get(name)
            if old is None:
                raise NotFound(f"no stream {name}")
            bad = sorted(set(changes) - set(PATCHABLE))
            if bad:
                raise Invalid(f"{bad[0]}: cannot be changed at runtime (only {', '.join(PATCHABLE)})",
                                  [(k, f"cannot be changed at runtime (only {', '.join(PATCHABLE)})") for k in bad])
            cfg = self.validate({**old.model_dump(exclude_unset=True, mode="json"), **changes})
            self._persist(name, self._patched_entry(name, changes))
            self.streams[name] = cfg
            running = self.runner.is_running(name)
            if running and cfg.enabled and self.runner.retune_stream(name, cfg):
                pass  # max_fps alone: applied live, the source keeps its connection
            else:
                if running:
                    await self.runner.remove_stream(name)
                if cfg.enabled:
                    await self.runner.add_stream(name, cfg)
            log.info("stream %s: changed through the API (%s)", name, ", ".join(sorted(changes)))
            return cfg

    async def delete(self, name: str) -> None:
        async with self._lock:
            if name not in self.streams:
                raise NotFound(f"no stream {name}")
            self._persist(name, None)
            del self.streams[name]
            if self.runner.is_running(name):
                await self.runner.remove_stream(name)
            log.info("stream %s: deleted through the API", name)

    # -- persistence -------------------------------------------------------------------------------
    def _entries(self) -> dict[str, Any]:
        path = self.overlay_file
        try:
            return read_overlay(path) if path is not None else {}
        except OverlayError as exc:
            raise Unavailable(f"{exc} (nothing was changed: fix or remove the file)") from None

    def _patched_entry(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        entry = self._entries().get(name)
        if entry is not None and "config" in entry:
            return {"config": {**entry["config"], **changes}}
        previous = entry["patch"] if entry is not None else {}
        toml = read_toml(self.config_path).get("streams", {}) if self.config_path is not None else {}
        if name not in toml:  # configured in-process (no file): keep the whole table
            return {"config": {**self.streams[name].model_dump(exclude_unset=True, mode="json"), **changes}}
        return {"patch": {**previous, **changes}}

    def persist_session(self, name: str, cfg: TalkConfig | None) -> None:
        """Keep a talk session the API started (`cfg`) or stopped (None) in the overlay, so a restart brings
        back what the API left running. Unavailable when it cannot be written (nothing changed)."""
        path = self.overlay_file
        if path is None:
            return
        try:
            talk = read_talk_overlay(path)
        except OverlayError as exc:
            raise Unavailable(f"{exc} (nothing was changed: fix or remove the file)") from None
        if cfg is not None:
            talk[name] = {"config": cfg.model_dump(mode="json", exclude_unset=True)}
        elif name in read_toml(self.config_path).get("talk", {}):  # type: ignore[arg-type]
            talk[name] = None  # stopped: stays stopped, though the TOML starts it
        else:
            talk.pop(name, None)
        self._write(self._entries(), talk)

    def _persist(self, name: str, entry: dict[str, Any] | None) -> None:
        path = self.overlay_file
        if path is None:
            return  # a pipeline built in-process without a config file: changes live in memory only
        entries = self._entries()
        if entry is None:
            toml = read_toml(self.config_path).get("streams", {})  # type: ignore[arg-type]
            if name in toml:
                entries[name] = None
            else:
                entries.pop(name, None)
        else:
            entries[name] = entry
        try:
            talk = read_talk_overlay(path)
        except OverlayError as exc:
            raise Unavailable(f"{exc} (nothing was changed: fix or remove the file)") from None
        self._write(entries, talk)

    def _write(self, entries: dict[str, Any], talk: dict[str, Any]) -> None:
        path = self.overlay_file
        assert path is not None
        overlay_disk = disk_state("overlay")
        try:
            write_overlay(path, entries, talk)
        except OSError as exc:
            overlay_disk.failed(exc, str(path.name))
            raise Unavailable(f"cannot keep the change in {path.name}: {exc.strerror or exc} (nothing was "
                              "changed; the folder of the config must be writable)") from None
        overlay_disk.wrote()
