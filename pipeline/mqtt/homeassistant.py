"""Home Assistant MQTT discovery: each stream becomes a device with its entities, made by HA itself.

For every stream, retained configs under `<discovery_prefix>/<component>/<node>/<object>/config`
describe entities that read topics framegrid already publishes:

    sensor         <stream> state           streams/<s>/state          {{ value_json.state }}
    sensor         <stream> objects         streams/<s>/objects/all    objects tracked now
    sensor         <stream> <label> count   streams/<s>/objects/<l>    per label
    camera         <stream> <label>         streams/<s>/snapshot/<l>   the last ended event's crop (JPEG)
    binary_sensor  <stream> <zone> occupied streams/<s>/zones/<z>/all  ON while anything is in the zone
    sensor         <stream> <line> in/out   streams/<s>/lines/<l>      crossings since start

Every entity is available while framegrid's availability topic says `online`. A removed stream's
configs are cleared (empty retained payloads), so HA removes its entities; when HA announces itself
`online` on `<discovery_prefix>/status` (after a restart), every config is sent again. One process
or a cluster head owns this; a cluster node's worker never does (its streams move).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pipeline.config import HomeAssistantConfig, StreamConfig
from pipeline.topics import Topics

from .publisher import Publisher

ORIGIN = {"name": "framegrid"}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def discovery_configs(stream: str, cfg: StreamConfig, labels: Sequence[str], topics: Topics,
                      discovery_prefix: str) -> dict[str, dict[str, Any]]:
    """The discovery config of every entity of one stream, by its config topic."""
    node = _slug(f"framegrid_{topics.prefix}")
    device = {"identifiers": [f"{node}_{_slug(stream)}"], "name": stream, "manufacturer": "framegrid",
              "model": "camera stream"}
    common = {"device": device, "origin": ORIGIN, "availability_topic": topics.availability,
              "payload_available": "online", "payload_not_available": "offline"}
    out: dict[str, dict[str, Any]] = {}

    def add(component: str, what: str, name: str, **keys: Any) -> None:
        object_id = _slug(f"{stream}_{what}")
        out[f"{discovery_prefix}/{component}/{node}/{object_id}/config"] = {
            "name": name, "unique_id": f"{node}_{object_id}", **common, **keys}

    add("sensor", "state", "State", state_topic=topics.stream_state(stream), value_template="{{ value_json.state }}",
        icon="mdi:cctv")
    count = {"state_class": "measurement", "unit_of_measurement": "objects", "icon": "mdi:counter"}
    add("sensor", "objects", "Objects", state_topic=topics.stream_count(stream, "objects", "all"), **count)
    for label in labels:
        add("sensor", f"{label}_count", f"{label} count",
            state_topic=topics.stream_count(stream, "objects", label), **count)
        add("camera", f"{label}_snapshot", f"{label} snapshot", topic=topics.snapshot(stream, label))
    for zone in cfg.zones:
        add("binary_sensor", f"zone_{zone}", f"{zone} occupied", device_class="occupancy",
            state_topic=topics.stream_count(stream, "zones", f"{zone}/all"),
            value_template="{{ 'ON' if value | int(0) > 0 else 'OFF' }}", payload_on="ON", payload_off="OFF")
    for line in cfg.lines:
        for direction in ("in", "out"):
            add("sensor", f"line_{line}_{direction}", f"{line} {direction}", state_class="total_increasing",
                state_topic=topics.stream_count(stream, "lines", line),
                value_template=f"{{{{ value_json['{direction}'] }}}}", icon="mdi:counter")
    return out


class HomeAssistant:
    """The retained discovery configs of the streams one process (or a cluster head) runs."""

    def __init__(self, cfg: HomeAssistantConfig, publisher: Publisher) -> None:
        self.cfg = cfg
        self.publisher = publisher
        self.announced: dict[str, dict[str, dict[str, Any]]] = {}  # stream -> its configs by topic
        self.resent = 0  # times HA's `online` made every config go out again
        if cfg.enabled:
            publisher.subscribe(f"{cfg.discovery_prefix}/status", self._ha_status)

    def labels_for(self, cfg: StreamConfig, model_classes: Sequence[str] | None,
                   model_names: Sequence[str]) -> list[str]:
        """The labels that get entities: the config's, else the stream's classes, else the model's."""
        return list(self.cfg.labels or cfg.classes or model_classes or model_names)

    def announce(self, stream: str, cfg: StreamConfig, labels: Sequence[str]) -> None:
        if not self.cfg.enabled:
            return
        configs = discovery_configs(stream, cfg, labels, self.publisher.topics, self.cfg.discovery_prefix)
        stale = set(self.announced.get(stream, {})) - set(configs)
        for topic in stale:  # an entity the stream no longer has (a zone removed by a change)
            self.publisher.publish(topic, b"", qos=1, retain=True)
        self.announced[stream] = configs
        for topic, body in configs.items():
            self.publisher.publish(topic, body, qos=1, retain=True)

    def withdraw(self, stream: str) -> None:
        for topic in self.announced.pop(stream, {}):
            self.publisher.publish(topic, b"", qos=1, retain=True)

    def _ha_status(self, _topic: str, payload: bytes) -> None:
        if payload.strip().lower() != b"online":
            return
        self.resent += 1
        for configs in self.announced.values():
            for topic, body in configs.items():
                self.publisher.publish(topic, body, qos=1, retain=True)
