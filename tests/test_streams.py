"""Media layer: redaction, backoff, the one-frame mailbox, file pacing and looping, failures, probe."""

from __future__ import annotations

import itertools
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from streams import (
    FAILED,
    RECONNECTING,
    STREAMING,
    Backoff,
    Frame,
    Mailbox,
    Source,
    SourceSettings,
    SourceState,
    redact_text,
    redact_url,
)
from streams.clock import SYSTEM_CLOCK, Clock
from streams.synthetic import MovingScene, write_video
from tests.support.procs import free_port


@pytest.fixture(scope="module")
def short_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("short") / "one-second.mp4"
    write_video(path, MovingScene(seed=3, width=320, height=180), seconds=1.0)
    return path


def test_redaction() -> None:
    assert redact_url("rtsp://admin:pa:ss@10.0.0.1:554/s") == "rtsp://admin:***@10.0.0.1:554/s"
    assert redact_url("rtsp://10.0.0.1/s") == "rtsp://10.0.0.1/s"
    assert redact_url("http://h/x?token=abc&b=1") == "http://h/x?token=***&b=1"
    text = "cannot open 'rtsp://u:p%40w@h/x' and rtmp://a:b@c/d"
    assert redact_text(text) == "cannot open 'rtsp://u:***@h/x' and rtmp://a:***@c/d"
    assert redact_text("pw is s3cret!", secrets=("s3cret!",)) == "pw is ***"


def test_a_stamp_is_one_moment_on_both_clocks_even_across_a_thread_switch() -> None:
    """A thread switch between the wall and the monotonic read (simulated: the monotonic clock
    jumps 6 ms on one read) would make a latency on the wall clock differ from the same latency on
    the monotonic clock by those 6 ms; `stamp` reads again."""
    walls = iter([100.0, 100.1])
    monos = iter([5.0, 5.006, 5.1, 5.1002])  # the first pair straddles a switch, the second does not
    wall, mono = Clock(wall=lambda: next(walls), mono=lambda: next(monos)).stamp()
    assert (wall, mono) == (100.1, 5.1002)
    wall, mono = SYSTEM_CLOCK.stamp()
    assert abs((time.time() - wall) - (time.monotonic() - mono)) < 0.002


def test_backoff_full_jitter_is_capped_and_resets() -> None:
    b = Backoff(base=0.5, cap=4.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(50)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert max(delays[10:]) > 2.0  # it does grow to the cap
    assert b.ceiling() == 4.0
    b.reset()
    assert b.ceiling() == 0.5
    assert b.next_delay() <= 0.5
    with pytest.raises(ValueError, match="bad backoff parameters"):
        Backoff(base=2, cap=1)


def _frame(stream: str, i: int) -> Frame:
    return Frame(stream, i, np.zeros((4, 4, 3), np.uint8), time.time(), i / 10, 0.1, time.monotonic())


def test_mailbox_overwrites_and_counts_stale() -> None:
    notified = []
    box = Mailbox("s", lambda: notified.append(1))
    for i in range(5):
        box.put(_frame("s", i))
    assert box.waiting_since is not None
    assert box.interval is not None
    first_wait = box.waiting_since
    assert box.take(now=first_wait + 0.001).index == 4  # type: ignore[union-attr]
    assert box.take() is None
    assert box.waiting_since is None
    assert (box.received, box.dropped_stale, len(notified)) == (5, 4, 5)
    later = first_wait + 10.0
    box.put(Frame("s", 5, np.zeros((4, 4, 3), np.uint8), time.time(), 0.5, 0.1, later))
    # the stream waits from its last service (round robin under overload), not from the frame's arrival
    assert box.waiting_since == first_wait + 0.001


def test_frame_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="stream x"):
        Frame("x", 0, np.zeros((4, 4), np.uint8), 0.0, None, 0.0)


def test_file_source_is_paced_and_loops_with_continuous_pts(short_video: Path) -> None:
    frames: list[Frame] = []
    src = Source("f", str(short_video), frames.append)  # local file: realtime + loop by default
    src.start()
    time.sleep(2.5)
    assert src.stop(5)
    # 15 fps for 2.5 s, minus open time: paced, not decoded as fast as possible
    assert 25 <= len(frames) <= 40, len(frames)
    pts = [f.pts for f in frames]
    assert all(b > a for a, b in itertools.pairwise(pts)), "pts must keep increasing across the loop"
    assert max(pts) > 1.0  # it did loop past the 1 s file
    assert [f.index for f in frames] == list(range(len(frames)))
    assert frames[0].image.shape == (180, 320, 3)


def test_unreachable_url_reconnects_with_redacted_error() -> None:
    states: list[SourceState] = []
    url = f"rtsp://cam:Very-Secret-1@127.0.0.1:{free_port()}/x"
    src = Source("dead", url, lambda f: None, states.append,
                 SourceSettings(open_timeout=2, stall_timeout=2, reconnect_base=0.05, reconnect_cap=0.2))
    src.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and src.state.reconnects < 3:
        time.sleep(0.05)
    assert src.stop(5)
    assert src.state.reconnects >= 3
    errors = [s.error for s in states if s.state == RECONNECTING]
    assert errors
    assert "Connection refused" in errors[-1]
    assert all("Very-Secret-1" not in (s.error or "") for s in states)
    assert "cam:***@" in errors[-1]


def test_not_video_file_fails_clearly(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.mp4"
    bogus.write_text("this is not a video\n" * 100)
    states: list[SourceState] = []
    done = threading.Event()

    def on_state(s: SourceState) -> None:
        states.append(s)
        if s.state == FAILED:
            done.set()

    src = Source("bogus", str(bogus), lambda f: None, on_state)
    src.start()
    assert done.wait(10)
    src.stop(2)
    assert states[-1].state == FAILED
    assert "cannot open" in (states[-1].error or "")
    assert "notes.mp4" in (states[-1].error or "")


def test_probe_cli(short_video: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", str(short_video)]) == 0
    out = capsys.readouterr().out
    assert "h264 320x180 15.00 fps" in out
    port = free_port()
    assert main(["probe", "--timeout", "2", f"rtsp://u:Hidden-9@127.0.0.1:{port}/s"]) == 2
    err = capsys.readouterr().err
    assert "probe failed" in err
    assert "Connection refused" in err
    assert "Hidden-9" not in err


def test_rtsp_source_streams_from_real_server(videos: dict[str, Path]) -> None:
    from tests.support.procs import RtspServer

    server = RtspServer({"cam": videos["cam1"]}, user="u", password="p@ss word")
    server.start()
    try:
        frames: list[Frame] = []
        url = f"rtsp://u:p%40ss%20word@127.0.0.1:{server.port}/cam"
        src = Source("cam", url, frames.append)
        assert not src.realtime
        assert not src.loop
        src.start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(frames) < 20:
            time.sleep(0.05)
        assert src.state.state == STREAMING
        assert src.stop(5)
    finally:
        server.kill()
    assert len(frames) >= 20
    assert frames[0].image.shape == (360, 640, 3)
    # a live source delivers at the camera's rate, pts on its own clock
    pts = [f.pts for f in frames if f.pts is not None]
    assert pts == sorted(pts)
    assert pts[-1] - pts[0] == pytest.approx((len(pts) - 1) / 15, abs=0.2)


def test_frames_are_converted_only_when_dispatched_and_as_the_reference_does(short_video: Path) -> None:
    """The decoder hands over pictures as decoded; one converts on first use to FFmpeg's own BGR."""
    import av

    from streams.frame import VideoPicture

    frames: list[Frame] = []
    src = Source("f", str(short_video), frames.append, options=SourceSettings(realtime=False, loop=False))
    src.start()
    deadline = time.monotonic() + 10
    while src.state.state != "ended" and time.monotonic() < deadline:
        time.sleep(0.05)
    src.stop(5)
    assert len(frames) == 15
    assert all(isinstance(f.picture, VideoPicture) for f in frames)
    assert not any(f.picture.converted for f in frames)  # decoding alone converts nothing
    assert (frames[3].width, frames[3].height) == (320, 180)  # known without converting
    assert not frames[3].picture.converted
    with av.open(str(short_video)) as c:
        reference = [vf.to_ndarray(format="bgr24") for vf in c.decode(video=0)]
    got = frames[7].image
    assert frames[7].picture.converted
    assert frames[7].picture.convert_ms is not None
    assert got.shape == (180, 320, 3)
    assert np.array_equal(got, reference[7])
    assert frames[7].image is got  # converted once
    assert sum(f.picture.converted for f in frames) == 1


def _decode_all(path: Path, **kwargs: object) -> tuple[list[Frame], Source]:
    frames: list[Frame] = []
    wanted = kwargs.pop("wanted_fps", None)
    src = Source("d", str(path), frames.append, options=SourceSettings(realtime=False, loop=False, **kwargs),
                 wanted_fps=wanted)  # type: ignore[arg-type]
    src.start()
    deadline = time.monotonic() + 20
    while src.state.state not in ("ended", "failed") and time.monotonic() < deadline:
        time.sleep(0.02)
    src.stop(5)
    return frames, src


def test_decoder_options_skip_frames_and_hardware_fallback(tmp_path: Path) -> None:
    """skip_frames: nonkey keeps one frame per GOP, nonref drops B-frames, auto follows max_fps;
    hwaccel without the device falls back to software and says why."""
    scene = MovingScene(seed=4, width=320, height=180, fps=25)
    ip, ibbp = tmp_path / "ip.mp4", tmp_path / "ibbp.mp4"
    write_video(ip, scene, seconds=2.0, gop_seconds=1.0)  # 50 frames, keyframes at 0 and 25
    write_video(ibbp, scene, seconds=2.0, gop_seconds=1.0, b_frames=2)
    everything, src = _decode_all(ibbp, skip_frames="none")
    assert len(everything) == 50
    assert src.skipping == "none"
    keys, src = _decode_all(ip, skip_frames="nonkey")
    assert len(keys) == 2
    assert src.skipping == "nonkey"
    refs, _ = _decode_all(ibbp, skip_frames="nonref")
    assert 14 <= len(refs) <= 20  # I and P only: about one frame in three
    pts = [f.pts for f in refs]
    assert pts == sorted(pts)
    assert pts[-1] > 1.8
    # auto: skip only when max_fps is at most a third of the camera's rate
    auto_low, src = _decode_all(ibbp, wanted_fps=5.0)
    assert src.skipping == "nonref"
    assert len(auto_low) == len(refs)
    auto_high, src = _decode_all(ibbp, wanted_fps=10.0)
    assert src.skipping == "none"
    assert len(auto_high) == 50
    # a hardware decoder: used where the device exists, else software with the reason recorded
    hw, src = _decode_all(ip, hwaccel="cuda", skip_frames="none")
    assert len(hw) == 50
    assert src.state.state == "ended"
    assert src.hw_decoding or (src.hw_error and "cannot open" in src.hw_error)
    if not src.hw_decoding:  # the software fallback is the plain decoder, pixel for pixel
        plain, _ = _decode_all(ip, skip_frames="none")
        assert np.array_equal(hw[10].image, plain[10].image)
    with pytest.raises(ValueError, match="hwaccel"):
        SourceSettings(hwaccel="nvidia-magic")


def test_shedding_decodes_only_keyframes_in_demand_and_each_at_once(tmp_path: Path) -> None:
    """Under decode shedding a live camera's non-key packets never reach the decoder, a keyframe is
    decoded only when in demand, and each comes out when fed: a frame-threaded decoder would hold a
    lone keyframe until more packets came (seconds away while shedding)."""
    clip = tmp_path / "gop.mp4"
    write_video(clip, MovingScene(seed=5, width=320, height=180, fps=25), seconds=4.0, gop_seconds=1.0)
    delivered: list[tuple[float | None, int]] = []  # (pts, packets skipped when it came out)
    keyframes = 0

    def demand() -> bool:
        nonlocal keyframes
        keyframes += 1
        return keyframes != 2  # the second keyframe finds its mailbox still full

    src = Source("d", str(clip), lambda f: delivered.append((f.pts, src.shed_packets)),
                 options=SourceSettings(realtime=False, loop=False), decode_threads=3)
    src.shed, src.demand = True, demand
    src.start()
    deadline = time.monotonic() + 20
    while src.state.state not in ("ended", "failed") and time.monotonic() < deadline:
        time.sleep(0.02)
    src.stop(5)
    assert keyframes == 4, delivered
    assert [round(p or 0, 2) for p, _ in delivered] == [0.0, 2.0, 3.0], delivered
    # each keyframe out before the next packet was looked at: after 0, 24+1+24 and 24 more skipped
    assert [skipped for _, skipped in delivered] == [0, 49, 73]
    assert src.shed_packets == 100 - 3 + 1  # and the demuxer's empty end-of-file packet


def test_max_retries_gives_up_and_says_why() -> None:
    """After `max_retries` failed attempts in a row a source stops trying: `failed`, with the last error."""
    states: list[SourceState] = []
    failed = threading.Event()

    def on_state(s: SourceState) -> None:
        states.append(s)
        if s.state == FAILED:
            failed.set()

    url = f"rtsp://cam:Very-Secret-1@127.0.0.1:{free_port()}/x"
    src = Source("dead", url, lambda f: None, on_state,
                 SourceSettings(open_timeout=2, stall_timeout=2, reconnect_base=0.05, reconnect_cap=0.1, max_retries=2))
    src.start()
    assert failed.wait(15), [s.state for s in states]
    time.sleep(0.5)  # and no attempt after that
    assert src.stop(5)
    assert states[-1].state == FAILED
    assert src.state.reconnects == 2
    assert "Connection refused" in (states[-1].error or "")
    assert "Very-Secret-1" not in (states[-1].error or "")


def test_a_camera_that_stalls_without_disconnecting_is_reconnected(tmp_path: Path) -> None:
    """A server that accepts the connection and then sends nothing (no RST, no EOF): the stall timer
    ends the read and the source reconnects, instead of waiting for ever."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                held.append(conn)  # never answer, never close
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    states: list[SourceState] = []
    url = f"rtsp://127.0.0.1:{listener.getsockname()[1]}/silent"
    src = Source("silent", url, lambda f: None, states.append,
                 SourceSettings(open_timeout=1.5, stall_timeout=1.5, reconnect_base=0.05, reconnect_cap=0.2))
    t0 = time.monotonic()
    src.start()
    deadline = t0 + 15
    while time.monotonic() < deadline and src.state.reconnects < 2:
        time.sleep(0.05)
    assert src.stop(5)
    stop.set()
    listener.close()
    for conn in held:
        conn.close()
    assert src.state.reconnects >= 2
    assert len(held) >= 2
    assert any(s.state == RECONNECTING and s.error for s in states)
