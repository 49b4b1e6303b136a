"""Runtime changes that outlive the process: the overlay file beside the config.

The HTTP API changes streams while running. Each acknowledged change is first written here
(`<config>.overlay.json`, beside `<config>.toml`), atomically: a temporary file in the same
folder, fsync, rename over the old one, fsync of the folder. A crash at any instant leaves the
old overlay or the new one, never a torn file. `load_config` applies the overlay on top of the
TOML at every start, and `framegrid validate` checks both together.

Per stream the overlay holds one of:
  null                  the stream is deleted (even if the TOML defines it)
  {"config": {...}}     the whole stream table (added at runtime, or replaced)
  {"patch": {...}}      keys changed on top of the TOML's table (its `${ENV}` placeholders stay)

and, under "talk", per talk session started or stopped through the API: null (stopped, even if the
TOML defines it) or {"config": {...}} (its whole table), so a restart (or a kill -9) brings back the
sessions the API started and not those it stopped.

The file holds stream URLs as given, passwords included (like the TOML): it is written mode 0600.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from streams.disk import write_atomic

OVERLAY_VERSION = 1


class OverlayError(ValueError):
    pass


def overlay_path(config_path: Path) -> Path:
    return config_path.with_name(config_path.stem + ".overlay.json")


def _load(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_text("utf-8")
    except FileNotFoundError:
        return {"v": OVERLAY_VERSION, "streams": {}}
    except OSError as exc:
        raise OverlayError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise OverlayError(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("v") != OVERLAY_VERSION or not isinstance(data.get("streams"), dict) \
            or not isinstance(data.get("talk", {}), dict):
        raise OverlayError(f"{path.name}: expected {{\"v\": {OVERLAY_VERSION}, \"streams\": {{...}}}} (and \"talk\": "
                           "{...})")
    for name, entry in data["streams"].items():
        if entry is None:
            continue
        if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in ("config", "patch") \
                or not isinstance(next(iter(entry.values())), dict):
            raise OverlayError(f"{path.name}: streams.{name} must be null, {{\"config\": {{...}}}} or "
                               "{\"patch\": {...}}")
    for name, entry in data.get("talk", {}).items():
        if entry is not None and (not isinstance(entry, dict) or set(entry) != {"config"}
                                  or not isinstance(entry["config"], dict)):
            raise OverlayError(f"{path.name}: talk.{name} must be null or {{\"config\": {{...}}}}")
    return data


def read_overlay(path: Path) -> dict[str, Any]:
    """The overlay's stream entries ({} when there is no file); OverlayError when it is unreadable."""
    return dict(_load(path)["streams"])


def read_talk_overlay(path: Path) -> dict[str, Any]:
    """The overlay's talk-session entries ({} when none); OverlayError when the file is unreadable."""
    return dict(_load(path).get("talk", {}))


def describe_overlay(overlay: dict[str, Any]) -> str:
    """One line saying what an overlay changes in the TOML's streams ('' when nothing)."""
    removed = sorted(n for n, e in overlay.items() if e is None)
    replaced = sorted(n for n, e in overlay.items() if e is not None and "config" in e)
    patched = sorted(f"{n} ({', '.join(sorted(e['patch']))})" for n, e in overlay.items()
                     if e is not None and "patch" in e)
    parts = [f"{what} {', '.join(names)}" for what, names in (("added or replaced", replaced),
                                                              ("changed", patched), ("removed", removed)) if names]
    return "; ".join(parts)


def apply_overlay(streams: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """The TOML's raw stream tables with the overlay's entries applied."""
    out = dict(streams)
    for name, entry in overlay.items():
        if entry is None:
            out.pop(name, None)
        elif "config" in entry:
            out[name] = dict(entry["config"])
        else:
            base = out.get(name)
            out[name] = {**(base if isinstance(base, dict) else {}), **entry["patch"]}
    return out


def apply_talk_overlay(talk: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """The TOML's raw talk tables with the overlay's session entries applied."""
    out = dict(talk)
    for name, entry in overlay.items():
        if entry is None:
            out.pop(name, None)
        else:
            out[name] = dict(entry["config"])
    return out


def write_overlay(path: Path, streams: dict[str, Any], talk: dict[str, Any] | None = None) -> None:
    """Replace the overlay atomically and durably (see the module's doc)."""
    data: dict[str, Any] = {"v": OVERLAY_VERSION, "streams": streams}
    if talk:
        data["talk"] = talk
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
