"""Home Assistant MQTT discovery against a real Mosquitto: the configs keep to HA's documented keys,
their state topics carry values their templates turn into valid states, a removed stream's entities
go away, and HA's `online` makes every config go out again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import paho.mqtt.client as paho
import pytest

from pipeline import parse_config
from pipeline.topics import Topics
from streams import StreamState
from tests.support.procs import MODEL, Mosquitto, Subscriber, start_pipeline, wait_until

# the configuration variables HA documents for MQTT discovery of each platform (www.home-assistant.io,
# integrations sensor.mqtt, binary_sensor.mqtt, camera.mqtt), and the ones each requires
COMMON = {"name", "unique_id", "object_id", "device", "origin", "availability_topic", "payload_available",
          "payload_not_available", "availability", "availability_mode", "availability_template", "icon", "qos",
          "enabled_by_default", "entity_category", "encoding", "json_attributes_topic", "json_attributes_template"}
PLATFORMS = {
    "sensor": (COMMON | {"state_topic", "value_template", "unit_of_measurement", "state_class", "device_class",
                         "expire_after", "force_update", "suggested_display_precision", "last_reset_value_template"},
               {"state_topic"}),
    "binary_sensor": (COMMON | {"state_topic", "value_template", "payload_on", "payload_off", "device_class",
                                "expire_after", "force_update", "off_delay"}, {"state_topic"}),
    "camera": (COMMON | {"topic", "image_encoding"}, {"topic"}),
}
DEVICE_KEYS = {"identifiers", "connections", "name", "manufacturer", "model", "model_id", "sw_version", "hw_version",
               "serial_number", "via_device", "suggested_area", "configuration_url"}
STATE_CLASSES = {"measurement", "total", "total_increasing"}


def valid_discovery(topic: str, body: dict[str, Any]) -> str:
    """Check one config against HA's documented keys; its platform."""
    prefix, platform, node, object_id, leaf = topic.split("/")
    assert (prefix, leaf) == ("homeassistant", "config"), topic
    assert all(c.isalnum() or c in "_-" for c in node + object_id), topic
    allowed, required = PLATFORMS[platform]
    assert set(body) <= allowed, (topic, set(body) - allowed)
    assert required <= set(body), topic
    assert set(body["device"]) <= DEVICE_KEYS
    assert body["device"]["identifiers"]
    assert body["origin"]["name"] == "framegrid"
    assert body.get("state_class", "measurement") in STATE_CLASSES
    assert body.get("device_class", "occupancy") == "occupancy"
    return platform


def render(template: str, payload: bytes) -> str:
    value = payload.decode()
    try:
        value_json = json.loads(value)
    except json.JSONDecodeError:
        value_json = None
    return jinja2.Environment(autoescape=False).from_string(template).render(value=value, value_json=value_json)


@pytest.mark.slow
async def test_discovery_entities_states_removal_and_resend(tmp_path: Path, mosquitto: Mosquitto,
                                                            topic_prefix: str) -> None:
    from streams.synthetic import Actor, ScriptedScene, write_video

    scene = ScriptedScene("ha", 23, (
        Actor(1, 0, 30, (40, 40, 230), ((1, 80, 80), (7, 560, 80))),
        Actor(2, 1, 30, (40, 200, 40), ((1, 560, 220), (7, 80, 220))),
    ), 8.0, width=640, height=360)
    video = tmp_path / "ha.mp4"
    write_video(video, scene, scene.seconds)
    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix},
        "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320}},
        "streams": {"cam": {"url": str(video), "model": "shapes", "max_fps": 5,
                            "zones": {"left": {"polygon": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]}},
                            "lines": {"mid": {"points": [[0.5, 0], [0.5, 1]]}}},
                    "yard": {"url": str(video), "model": "shapes", "max_fps": 2, "classes": ["square"]}},
        "pipeline": {"status_interval": 0},
        "events": {"store": str(tmp_path / "ev" / "events.db")},
        "homeassistant": {"enabled": True},
    }, tmp_path)
    ha = Subscriber(mosquitto.port, "homeassistant/#")
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    pipeline, shutdown = await start_pipeline(config)
    configs = lambda: {m.topic: m for m in ha.messages if m.topic.endswith("/config")}  # noqa: E731
    try:
        lines = f"{topic_prefix}/streams/cam/lines/mid"
        await wait_until(lambda: sub.of(lines) and sub.of("/streams/cam/zones/left/all"), 60,
                         "a line crossing and a zone count")
        seen = {t: json.loads(m.payload) for t, m in configs().items()}
        platforms = [valid_discovery(t, body) for t, body in seen.items()]
        assert len({b["unique_id"] for b in seen.values()}) == len(seen)
        by_name = {(b["device"]["name"], b["name"]): b for b in seen.values()}
        # cam: state, objects, 3 labels x (count + camera), one zone, one line x (in, out); yard: only squares
        assert platforms.count("binary_sensor") == 1
        assert platforms.count("camera") == 4
        assert len(seen) == 2 + 6 + 1 + 2 + (2 + 2)
        assert by_name[("yard", "square snapshot")]["topic"] == Topics(topic_prefix).snapshot("yard", "square")
        assert ("yard", "circle count") not in by_name
        for body in seen.values():
            assert body["availability_topic"] == f"{topic_prefix}/availability"

        # each state topic's latest value, through its entity's template, is a state HA accepts
        rendered: dict[tuple[str, str], str] = {}
        for key, body in by_name.items():
            got = sub.of(body.get("state_topic", "-").removeprefix(topic_prefix))
            if got and "state_topic" in body:
                rendered[key] = render(body.get("value_template", "{{ value }}"), got[-1].payload)
        assert rendered[("cam", "State")] in {s.value for s in StreamState}
        assert rendered[("cam", "State")] == "streaming"
        assert int(rendered[("cam", "mid in")]) + int(rendered[("cam", "mid out")]) >= 1
        assert int(rendered[("cam", "Objects")]) >= 0
        assert rendered[("cam", "left occupied")] in ("ON", "OFF")
        zone = by_name[("cam", "left occupied")]
        assert "ON" in {render(zone["value_template"], m.payload) for m in sub.of("/streams/cam/zones/left/all")}
        counts = [int(render("{{ value }}", m.payload)) for m in sub.of("/streams/cam/objects/all")]
        assert max(counts) >= 1

        # HA restarted: it says `online`, and every config goes out again
        before = len(ha.messages)
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"ha-{topic_prefix}")
        client.connect("127.0.0.1", mosquitto.port)
        client.loop_start()
        client.publish("homeassistant/status", b"online", qos=1).wait_for_publish(5)
        await wait_until(lambda: len(ha.messages) >= before + len(seen), 20, "configs sent again")
        client.loop_stop()
        client.disconnect()

        # a removed stream's entities are withdrawn: empty retained configs, none left on the broker
        await pipeline.running.remove_stream("cam")
        cam_topics = {t for t, b in seen.items() if b["device"]["name"] == "cam"}
        await wait_until(lambda: all(configs()[t].payload == b"" for t in cam_topics), 20, "cam's configs cleared")
    finally:
        await shutdown()
        sub.close()
        ha.close()
    fresh = Subscriber(mosquitto.port, "homeassistant/#")
    try:
        await wait_until(lambda: len(fresh.messages) >= len(seen) - len(cam_topics), 10, "retained configs")
        assert {m.topic for m in fresh.messages} == set(seen) - cam_topics
    finally:
        fresh.close()
