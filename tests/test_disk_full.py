"""A full disk under the event store, snapshots, clips and the overlay: one clear state, the pipeline
keeps publishing, no acknowledged event is lost, and writing resumes by itself when space returns.
On a real small tmpfs (mounting needs root, as the test command runs)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.support.procs import MODEL, Mosquitto, Subscriber, start_pipeline, wait_until


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the test command runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        for filler in list(Filler.running):  # a test that failed before releasing its filler: release it
            filler.release()  # before the unmount, or it would go on filling the disk under the mount point
        subprocess.run(["umount", "-l", str(mount)], check=False)


class Filler:
    """Takes every free byte of the file system under `folder`, and keeps taking what is freed (a clip's
    partial file deleted, a journal rolled back) until `release()` gives it all back."""

    running: ClassVar[list[Filler]] = []  # not released yet (the `small_disk` fixture releases them)

    def __init__(self, folder: Path) -> None:
        if not os.path.ismount(folder):
            raise RuntimeError(f"{folder} is not the small tmpfs: a filler there would fill the real disk")
        self.folder = folder
        self.path = folder / "filler"
        self._stop = threading.Event()
        self._top_up()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        Filler.running.append(self)

    def _top_up(self) -> None:
        if not os.path.ismount(self.folder):  # unmounted under it: never the disk beneath
            return
        for block in (1 << 20, 64 << 10, 1024):  # then the last partial blocks
            with contextlib.suppress(OSError), self.path.open("ab") as f:
                while True:
                    f.write(b"\0" * block)
                    f.flush()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._top_up()

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)
        if self in Filler.running:
            Filler.running.remove(self)


def events_in(db: Path) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(db)
    try:
        return {r[0]: {"end_time": r[1], "data": json.loads(r[2])}
                for r in conn.execute("SELECT id, end_time, data FROM events")}
    finally:
        conn.close()


@pytest.mark.slow
async def test_a_full_disk_is_a_state_the_pipeline_rides_out_and_leaves_by_itself(
    small_disk: Path, tmp_path: Path, mosquitto: Mosquitto, topic_prefix: str
) -> None:
    import httpx

    from pipeline import parse_config
    from pipeline.api import local_api
    from streams.synthetic import MovingScene, write_video

    # an 8 s scene, looped: at each loop the shapes jump back to where they started, so their tracks
    # are lost and events end every 8 s (the shapes of a long scene bounce about and may all stay tracked)
    video = tmp_path / "looped.mp4"
    write_video(video, MovingScene(seed=11), seconds=8)

    db = small_disk / "events.db"
    config_path = small_disk / "fg.toml"  # its overlay (changes made through the API) beside it
    config_path.write_text("# streams come from the test\n")
    config = parse_config({
        "mqtt": {"url": mosquitto.url, "topic_prefix": topic_prefix},
        "models": {"shapes": {"type": "yolo", "weights": str(MODEL), "imgsz": 320}},
        "streams": {"a": {"url": str(video), "model": "shapes", "max_fps": 5,
                          "record": {"enabled": True, "pre_s": 1.0, "post_s": 0.5}}},
        "pipeline": {"status_interval": 0},
        "events": {"store": str(db), "end_after": 0.4, "update_interval": 0.3},
        "record": {"dir": str(small_disk / "clips")},
    }, tmp_path)
    sub = Subscriber(mosquitto.port, f"{topic_prefix}/#")
    pipeline, shutdown = await start_pipeline(config, config_path=config_path)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=local_api(pipeline, config_path).app),
                               base_url="http://framegrid")
    store = pipeline.analytics.store
    assert store is not None

    def disk(writer: str) -> dict[str, Any]:
        return pipeline.stats_payload()["disk"].get(writer, {"full": False, "held": 0, "errors": 0})

    def detections() -> int:
        return len(sub.of("/streams/a/detections"))

    try:
        await wait_until(lambda: store.written >= 3, 60, "events stored before the disk fills")
        filler = Filler(small_disk)
        await wait_until(lambda: disk("event store")["full"], 30, "the event store to meet the full disk")
        await wait_until(lambda: disk("event store")["held"] > 0, 10, "event writes held for later")
        during = detections()
        full_from = len(sub.of(f"{topic_prefix}/events"))

        def ended_while_full() -> bool:
            return any(json.loads(m.payload)["type"] == "end" for m in sub.of(f"{topic_prefix}/events")[full_from:])

        await wait_until(lambda: detections() >= during + 10, 30, "detections published while the disk is full")
        await wait_until(ended_while_full, 30, "an event that ended while the disk was full")
        await wait_until(lambda: disk("snapshots")["full"] and disk("clips")["full"], 30,
                         "the snapshot and clip writers to meet the full disk (an ended event's media)")
        stats = pipeline.stats_payload()
        assert stats["disk"]["event store"]["last_error"]
        assert "full" in str(stats["disk"]["event store"]["last_error"])
        text = (await client.get("/metrics")).text
        assert 'framegrid_disk_full{writer="event store"} 1.0' in text
        # a change through the API cannot be kept: refused whole, with the reason, and the state says so
        refused = await client.patch("/api/streams/a", json={"max_fps": 4})
        assert refused.status_code == 503, refused.text
        assert "No space left" in refused.json()["detail"]
        assert pipeline.running.records["a"].cfg.max_fps == 5
        assert disk("overlay")["full"]
        filler.release()  # space returns
        await wait_until(lambda: not disk("event store")["full"] and disk("event store")["held"] == 0, 30,
                         "the event store to write again by itself")
        assert 'framegrid_disk_full{writer="event store"} 0.0' in (await client.get("/metrics")).text
        kept = await client.patch("/api/streams/a", json={"max_fps": 4})
        assert kept.status_code == 200, kept.text
        assert not disk("overlay")["full"]
        assert json.loads((small_disk / "fg.overlay.json").read_text())["streams"]["a"]
        published_end = detections()
        await wait_until(lambda: detections() >= published_end + 5, 30, "detections after the disk emptied")
    finally:
        await client.aclose()
        await shutdown()
        sub.close()
    stored = events_in(db)
    published = [json.loads(m.payload) for m in sub.of(f"{topic_prefix}/events")]
    assert published, "events were published"
    # every event published (acknowledged by the pipeline) is in the store as last published, ended ones
    # as ended: a write the full disk refused was held and written, not replaced by a later one
    last = {e["after"]["id"]: e for e in published if e["type"] in ("new", "update", "end")}
    for event_id, e in last.items():
        assert event_id in stored, event_id
        assert stored[event_id]["data"]["last_seen"] == e["after"]["last_seen"], (event_id, e["type"])
        assert (stored[event_id]["end_time"] is not None) == (e["type"] == "end"), (event_id, e["type"])
    assert store.dropped == 0


async def test_a_talk_job_on_a_full_disk_fails_with_the_reason_and_the_next_one_runs(
    small_disk: Path, face_image: Path, tmp_path: Path
) -> None:
    import asyncio

    from pipeline.talk.jobs import TalkJobs
    from streams.disk import disk_state
    from tests.support.media import tone_on_off, write_wav
    from tests.support.procs import wait_until

    wav = write_wav(tmp_path / "a.wav", tone_on_off([(2.0, True)]), 16_000)
    jobs = TalkJobs(small_disk / "jobs", 10**8, lambda: 1)
    runner = asyncio.create_task(jobs.run())
    try:
        first = await jobs.submit(None, None, str(face_image), str(wav), "energy")  # its inputs fit
        filler = Filler(small_disk)  # then its video cannot be written
        try:
            await wait_until(lambda: jobs.get(first.id).state in ("done", "failed"), 60, "the first job")  # type: ignore[union-attr]
            failed = jobs.get(first.id)
            assert failed is not None
            assert failed.state == "failed", failed
            assert str(failed.error).startswith("the disk is full"), failed.error
            assert disk_state("talk jobs").full
        finally:
            filler.release()
        second = await jobs.submit(None, None, str(face_image), str(wav), "energy")
        await wait_until(lambda: jobs.get(second.id).state in ("done", "failed"), 60, "the second job")  # type: ignore[union-attr]
        done = jobs.get(second.id)
        assert done is not None
        assert done.state == "done", done.error
        assert not disk_state("talk jobs").full
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


def test_avatar_caches_on_a_full_disk_cost_only_the_work_they_save(
    small_disk: Path, face_image: Path, musetalk_model: Any
) -> None:
    """The face-search cache and MuseTalk's latents cache meet a full disk: the avatar is prepared all
    the same (the session or job goes on), the `avatar cache` writer is full, no partial file is left;
    with room again both caches are written and the state clears by itself."""
    from streams.disk import disk_state
    from talkinghead import prepare_avatar

    cache = small_disk / "avatars"
    filler = Filler(small_disk)
    try:
        avatar = prepare_avatar(face_image, cache_dir=cache)
        faces = musetalk_model.prepare_faces(avatar, cache_dir=cache)
        assert faces, "no face prepared"
        assert disk_state("avatar cache").full
        assert "No space left" in str(disk_state("avatar cache").last_error)
        assert not [p for p in cache.rglob("*") if p.is_file()], list(cache.rglob("*"))  # no partial cache file
    finally:
        filler.release()
    again = prepare_avatar(face_image, cache_dir=cache)
    assert not disk_state("avatar cache").full  # the face cache was written
    assert again.key == avatar.key
    musetalk_model.prepare_faces(again, cache_dir=cache)
    assert not disk_state("avatar cache").full
    written = sorted(p.suffix for p in cache.iterdir())
    assert written == [".json", ".npz"], written
    cached = musetalk_model.prepare_faces(again, cache_dir=cache)  # read back from the cache
    assert [f.crop for f in cached] == [f.crop for f in faces]
