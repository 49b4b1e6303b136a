"""End to end: real RTSP cameras -> `framegrid run` -> real Mosquitto -> a subscriber.

Everything here is real: gst-rtsp-server serves rendered videos, the trained shapes model
detects, Mosquitto carries the results. Detections are scored against the renderer's truth.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from streams.synthetic import CLASSES
from tests.support.configs import write_config
from tests.support.media import detections, iou, states
from tests.support.procs import Framegrid, Mosquitto, RtspServer, Subscriber, free_port

PASSWORD = "Sup3r-s3cret-pw"



@pytest.mark.slow
def test_two_rtsp_cameras_detections_match_ground_truth(
    tmp_path: Path, videos: dict[str, Path], scenes: dict[str, Any], mosquitto: Mosquitto,
    topic_prefix: str, framegrid_env: dict[str, str],
) -> None:
    server = RtspServer(videos, user="viewer", password=PASSWORD)
    server.start()
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    try:
        cfg = write_config(tmp_path / "fg.toml", topic_prefix, mosquitto.url,
                           {n: server.url(n) for n in ("cam1", "cam2")})
        fg = Framegrid(cfg, framegrid_env, tmp_path / "fg.log")
        sub.wait_for(lambda: all(len(detections(sub, n)) >= 25 for n in ("cam1", "cam2")), 90,
                     "25 detection messages per camera")
        rc = fg.stop()
        assert rc == 0, fg.output()
        sub.wait_for(lambda: any(m.payload == b"offline" for m in sub.of("/availability")), 5, "offline")
    finally:
        sub.close()
        server.kill()

    assert next(m.payload for m in sub.of("/availability")) == b"online"
    matched = total = 0
    for name in ("cam1", "cam2"):
        msgs = detections(sub, name)
        seqs = [m["seq"] for m in msgs]
        assert seqs == sorted(seqs), f"{name}: seq not increasing: {seqs}"
        assert len(set(seqs)) == len(seqs), f"{name}: seq not increasing: {seqs}"
        for m in msgs:
            assert m["stream"] == name
            assert m["model"] == "shapes"
            assert (m["width"], m["height"]) == (640, 360)
            assert m["captured_at"] <= m["inferred_at"] <= m["published_at"]
            assert 0 < m["latency_ms"] < 3000
            # measured on the monotonic clock: equal to the stamps' difference while the wall clock holds still
            assert abs(m["latency_ms"] - (m["published_at"] - m["captured_at"]) * 1000) < 5.0
            assert time.time() - 300 < m["captured_at"] < time.time()
        scene = scenes[name]
        for m in msgs[5:]:  # sampled frames after start-up
            # RTSP presentation times are on the file's timeline (npt): frame i has pts i / fps
            truth = scene.truth_at(round(m["pts"] * scene.fps))
            for cid, box, occluded in zip(truth.class_ids, truth.boxes, truth.occluded, strict=True):
                if occluded:
                    continue
                total += 1
                if any(d["label"] == CLASSES[cid] and iou(d["box"], box) >= 0.5 for d in m["detections"]):
                    matched += 1
    assert total > 100
    assert matched / total >= 0.9, f"only {matched}/{total} ground-truth objects detected"
    log = fg.output()
    everything = log + "".join(m.payload.decode(errors="replace") for m in sub.messages)
    assert PASSWORD not in everything
    assert "viewer:***@" in everything  # the URL is shown, redacted


@pytest.mark.slow
def test_rtsp_server_restart_reconnects_and_other_camera_continues(
    tmp_path: Path, videos: dict[str, Path], mosquitto: Mosquitto, topic_prefix: str,
    framegrid_env: dict[str, str],
) -> None:
    flaky = RtspServer({"cam1": videos["cam1"]})
    steady = RtspServer({"cam2": videos["cam2"]})
    flaky.start()
    steady.start()
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    try:
        cfg = write_config(tmp_path / "fg.toml", topic_prefix, mosquitto.url,
                           {"cam1": flaky.url("cam1"), "cam2": steady.url("cam2")})
        fg = Framegrid(cfg, framegrid_env, tmp_path / "fg.log")
        sub.wait_for(lambda: len(detections(sub, "cam1")) >= 5 and len(detections(sub, "cam2")) >= 5, 90,
                     "both cameras detecting")
        flaky.kill()
        t_kill = time.time()
        sub.wait_for(lambda: "reconnecting" in states(sub, "cam1"), 15, "cam1 reconnecting")
        time.sleep(3)  # an outage of several seconds
        n2_during = [m for m in detections(sub, "cam2") if m["captured_at"] > t_kill + 0.5]
        flaky.start()  # same port
        t_back = time.time()
        sub.wait_for(lambda: any(m["captured_at"] > t_back for m in detections(sub, "cam1")), 30,
                     "cam1 detections after the server came back")
        rc = fg.stop()
        assert rc == 0, fg.output()
    finally:
        sub.close()
        flaky.kill()
        steady.kill()
    assert len(n2_during) >= 5, "cam2 stopped while cam1's server was down"
    s1 = states(sub, "cam1")
    i = s1.index("reconnecting")
    assert "streaming" in s1[i:], s1
    last_state = [m.json() for m in sub.of("/streams/cam1/state")]
    assert max(s["reconnects"] for s in last_state) >= 1
    seqs = [m["seq"] for m in detections(sub, "cam1")]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    # the reconnect ended cam1's tracks (and their events); the objects got new track ids after it
    before = {d["track_id"] for m in detections(sub, "cam1") if m["captured_at"] < t_kill
              for d in m["detections"] if d["track_id"]}
    after = {d["track_id"] for m in detections(sub, "cam1") if m["captured_at"] > t_back
             for d in m["detections"] if d["track_id"]}
    assert before, (before, after)
    assert after, (before, after)
    assert min(after) > max(before), (before, after)
    ended = {e["after"]["track_id"] for e in (m.json() for m in sub.of("/events"))
             if e["stream"] == "cam1" and e["type"] == "end"}
    assert before <= ended


@pytest.mark.slow
def test_broker_restart_keeps_pipeline_running_with_honest_drop_counters(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, videos: dict[str, Path], topic_prefix: str,
    framegrid_env: dict[str, str],
) -> None:
    # persistent broker and subscriber session: every loss the subscriber sees is framegrid's
    broker = Mosquitto(tmp_path_factory.mktemp("own-broker"), port=free_port(), persistent=True)
    broker.start()
    sub = Subscriber(broker.port, f"{topic_prefix}/#", persistent=True)
    try:
        # a file camera: the broker is the only thing that fails here
        cfg = write_config(tmp_path / "fg.toml", topic_prefix, broker.url, {"cam": str(videos["cam1"])},
                           buffer=15, stats_interval=1, max_fps=8)
        fg = Framegrid(cfg, framegrid_env, tmp_path / "fg.log")
        sub.wait_for(lambda: len(detections(sub, "cam")) >= 10, 90, "detections before the outage")
        broker.stop()
        time.sleep(5)  # ~40 results at 8 fps against a buffer of 15
        broker.start()
        t_back = time.time()
        sub.wait_for(lambda: any(m.at > t_back + 1 for m in sub.of("/streams/cam/detections")), 30,
                     "detections after the broker came back")
        sub.wait_for(lambda: any(m.at > t_back + 1 and m.json()["mqtt"]["dropped_overflow"] > 0
                                 for m in sub.of("/stats")), 15, "stats reporting drops")
        # a new subscriber still gets the stream's retained state
        late = Subscriber(broker.port, f"{topic_prefix}/streams/cam/state")
        late.wait_for(lambda: any(m.retain and m.json()["state"] == "streaming" for m in late.messages), 10,
                      "retained state after broker restart")
        late.close()
        rc = fg.stop()
        assert rc == 0, fg.output()
    finally:
        sub.close()
        broker.stop()
    seqs = sorted({m["seq"] for m in detections(sub, "cam")})
    missing = (seqs[-1] - seqs[0] + 1) - len(seqs)
    last = [m.json() for m in sub.of("/stats")][-1]
    assert missing > 0, "an outage longer than the buffer must lose detections"
    # framegrid's own account at exit: every result was acknowledged by the broker or counted as dropped
    line = next(ln for ln in fg.output().splitlines() if "mqtt: final account " in ln)
    final = json.loads(line.split("mqtt: final account ", 1)[1])
    assert final["buffered"] == 0
    dropped = final["dropped_by_kind"]["detections"]
    assert final["published_by_kind"]["detections"] + dropped == final["results"]["cam"] >= seqs[-1], final
    # the broker keeps the subscriber's session across its restart (its database in a folder it can
    # write, a queue longer than the outage), so the subscriber misses exactly as many detections as
    # framegrid says it dropped (counts: framegrid does not name the frames it dropped)
    assert dropped == missing > 0, (missing, final)
    assert last["mqtt"]["dropped_overflow"] == sum(last["mqtt"]["dropped_by_kind"].values())
    assert last["mqtt"]["connects"] >= 2


@pytest.mark.slow
def test_broker_unreachable_at_start_then_there(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, videos: dict[str, Path], topic_prefix: str,
    framegrid_env: dict[str, str],
) -> None:
    """framegrid starts while nothing listens on the broker's port: it runs (decodes, infers, buffers),
    says so once, and delivers when the broker appears; the first results are among them."""
    port = free_port()
    cfg = write_config(tmp_path / "fg.toml", topic_prefix, f"mqtt://127.0.0.1:{port}", {"cam": str(videos["cam1"])},
                       buffer=1000, stats_interval=1, max_fps=4)
    fg = Framegrid(cfg, framegrid_env, tmp_path / "fg.log")
    broker = Mosquitto(tmp_path_factory.mktemp("late-broker"), port=port, persistent=False)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "model shapes" not in fg.output():
            time.sleep(0.2)
        time.sleep(3)  # running without a broker: results go to the buffer
        assert fg.proc.poll() is None, fg.output()
        broker.start()
        sub = Subscriber(broker.port, f"{topic_prefix}/#")
        sub.wait_for(lambda: len(detections(sub, "cam")) >= 20, 60, "buffered and new detections")
        seqs = sorted(m["seq"] for m in detections(sub, "cam"))
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap in what the subscriber saw
        sub.close()
        assert fg.stop() == 0
    finally:
        broker.stop()
    # framegrid's own account: every result from the first was acknowledged by the broker, none dropped
    line = next(ln for ln in fg.output().splitlines() if "mqtt: final account " in ln)
    final = json.loads(line.split("mqtt: final account ", 1)[1])
    assert final["published_by_kind"]["detections"] == final["results"]["cam"] >= 20, final
    assert final["dropped_by_kind"].get("detections", 0) == 0
    assert final["connects"] == 1
    unavailable = [ln for ln in fg.output().splitlines() if "unavailable" in ln]
    assert len(unavailable) == 1, unavailable  # said once, not at every retry
