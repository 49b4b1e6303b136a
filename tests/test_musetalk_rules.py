"""MuseTalk v1.5's published rules, each checked against a reference written here from the algorithm.

Blend-mask geometry (jaw parsing mode, the unclipped blend square, the blur kernels), version
defaults, video avatars at 25 fps, the silence policy and its cross-fades, the exact log-mel of
short audio, and live audio prompts against the offline ones.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from talkinghead.faceparse import cheek_mask, cone_kernel, face_mask
from talkinghead.musetalk import (
    BLUR_OFFLINE,
    BLUR_REALTIME,
    MuseTalk,
    PreparedFace,
    blend_mask,
    blend_region,
    version_defaults,
)
from talkinghead.offline import Crossfade, model_frames


# -- jaw parsing mode --------------------------------------------------------------------------------
def reference_jaw(parsing: np.ndarray, cheek: int = 90) -> np.ndarray:
    """The published `FaceParsing(mode="jaw")` steps, written out literally."""
    cone_height, tail_height = 21, 12
    total = cone_height + tail_height
    kernel = np.zeros((total, total), np.uint8)
    cx = total // 2
    for row in range(cone_height):
        if row < cone_height // 2:
            continue
        width = 2 * (row - cone_height // 2) + 1
        kernel[row, cx - width // 2:cx + width // 2 + 1] = 1
    base = int(kernel[cone_height - 1].sum())
    for row in range(cone_height, total):
        kernel[row, max(0, cx - base // 2):min(total, cx + base // 2 + 1)] = 1
    cheeks = np.zeros((512, 512), np.uint8)
    cv2.rectangle(cheeks, (0, 0), (256 - cheek, 512), 255, -1)
    cv2.rectangle(cheeks, (256 + cheek, 0), (512, 512), 255, -1)
    parsing = parsing.astype(np.int64).copy()
    face = (np.isin(parsing, [1]) * 255).astype(np.uint8)
    dilated = cv2.dilate(face, kernel, iterations=1)
    eroded = cv2.erode(dilated, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3)), iterations=2)
    face = cv2.bitwise_or(cv2.bitwise_and(eroded, cheeks), cv2.bitwise_and(dilated, ~cheeks))
    parsing[(face == 255) & (~np.isin(parsing, [10]))] = 255
    parsing[np.isin(parsing, [11, 12, 13])] = 255
    parsing[parsing != 255] = 0
    return parsing.astype(np.uint8)


def synthetic_parse() -> np.ndarray:
    """A 512x512 label map: hair (17), skin (1) with a nose (10), mouth (11) and lips (12, 13), neck (14)."""
    labels = np.zeros((512, 512), np.uint8)
    cv2.rectangle(labels, (200, 380), (312, 511), 14, -1)  # neck
    cv2.ellipse(labels, (256, 250), (150, 180), 0, 0, 360, 1, -1)  # skin
    cv2.ellipse(labels, (256, 110), (160, 80), 0, 180, 360, 17, -1)  # hair on top
    cv2.rectangle(labels, (236, 200), (276, 290), 10, -1)  # nose
    cv2.ellipse(labels, (256, 340), (50, 14), 0, 0, 360, 12, -1)  # upper lip
    cv2.ellipse(labels, (256, 356), (46, 12), 0, 0, 360, 13, -1)  # lower lip
    cv2.ellipse(labels, (256, 348), (36, 5), 0, 0, 360, 11, -1)  # mouth
    return labels


def test_jaw_mode_follows_the_published_steps() -> None:
    labels = synthetic_parse()
    jaw = face_mask(labels, "jaw", 90)
    assert np.array_equal(jaw, reference_jaw(labels, 90))
    assert np.array_equal(face_mask(labels, "jaw", 40), reference_jaw(labels, 40))
    raw = face_mask(labels, "raw")
    assert np.array_equal(raw, np.isin(labels, [1, 11, 12, 13]).astype(np.uint8) * 255)
    assert np.array_equal(face_mask(labels, "neck"), np.isin(labels, [1, 11, 12, 13, 14]).astype(np.uint8) * 255)
    # what the rules are for: the nose is left out, mouth and lips are in
    assert not jaw[labels == 10].any()
    assert jaw[np.isin(labels, [11, 12, 13])].all()
    # the chin: jaw mode reaches a few pixels below the skin's lowest row in the middle (the cone's
    # tip), where raw mode stops at the skin
    chin = int(np.flatnonzero((labels == 1).any(axis=1)).max())
    assert jaw[chin + 5, 256] == 255
    assert raw[chin + 5, 256] == 0
    assert jaw[chin + 8, 256] == 0
    # ... and sideways far less than downward
    row = 250
    skin_right = int(np.flatnonzero(labels[row] == 1).max())
    assert jaw[row, skin_right + 12] == 0
    # the cheeks outside the central band are eroded: the jaw mask is narrower there than the dilation
    dilated = cv2.dilate((labels == 1).astype(np.uint8) * 255, cone_kernel())
    assert (jaw[:, :256 - 90] < dilated[:, :256 - 90]).any()
    assert cone_kernel().shape == (33, 33)
    assert cone_kernel()[20].sum() == 21
    assert cone_kernel()[:10].sum() == 0
    assert cheek_mask(90)[:, 167:346].max() == 0
    assert cheek_mask(90)[:, 166].min() == 255
    with pytest.raises(ValueError, match="parsing mode"):
        face_mask(labels, "chin")


# -- the blend square: unclipped, as upstream ---------------------------------------------------------
def parse_of(image: np.ndarray) -> np.ndarray:
    """A stand-in parser with a shape: bright pixels are 'face' (black padding never is)."""
    return ((image.mean(axis=2) > 60) * 255).astype(np.uint8)


def test_blend_mask_near_an_edge_is_built_on_the_whole_square() -> None:
    """Reference: the frame padded with black so that the square fits, the mask built there (as
    upstream's PIL crop pads), then cut back. The clipped square moved the upper boundary."""
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 255, (240, 320, 3), np.uint8)
    box = (5, 8, 105, 128)  # near the top-left corner: the 1.5x square reaches outside
    crop = blend_region(box, 1.5)
    assert crop[0] < 0
    assert crop[1] < 0
    from talkinghead.musetalk import padded_crop

    for blur in (BLUR_OFFLINE, BLUR_REALTIME):
        mask = blend_mask(box, crop, parse_of(padded_crop(frame, crop)), blur=blur)
        pad = 200
        big = np.zeros((240 + 2 * pad, 320 + 2 * pad, 3), np.uint8)
        big[pad:pad + 240, pad:pad + 320] = frame
        x1, y1, x2, y2 = (v + pad for v in box)
        s = int(max(x2 - x1, y2 - y1) // 2 * 1.5)
        xc, yc = (x1 + x2) // 2, (y1 + y2) // 2
        sq = big[yc - s:yc + s, xc - s:xc + s]
        ref = np.zeros(sq.shape[:2], np.uint8)
        ref[y1 - (yc - s):y2 - (yc - s), x1 - (xc - s):x2 - (xc - s)] = parse_of(sq)[
            y1 - (yc - s):y2 - (yc - s), x1 - (xc - s):x2 - (xc - s)]
        ref[: int(2 * s * 0.5)] = 0
        k = int(blur * 2 * s // 2 * 2) + 1
        ref = cv2.GaussianBlur(ref, (k, k), 0)
        assert mask.shape == ref.shape
        assert np.array_equal(mask, ref)
    # pasting uses the part of the square inside the image: a generated face changes nothing above
    # the square's centre line (the upper boundary) apart from the blur's reach
    face = PreparedFace(frame, box, None, crop, mask)
    out = MuseTalk.paste(face, np.full((256, 256, 3), 255, np.uint8))
    centre = (box[1] + box[3]) // 2
    k = int(BLUR_REALTIME * (crop[2] - crop[0]) // 2 * 2) + 1
    assert np.array_equal(out[: centre - k], frame[: centre - k])
    assert not np.array_equal(out[centre:box[3]], frame[centre:box[3]])


def test_version_defaults_and_blur_kernels() -> None:
    assert version_defaults("v15") == {"extra_margin": 10, "expand": 1.5, "parsing_mode": "jaw"}
    assert version_defaults("v1") == {"extra_margin": 0, "expand": 1.5, "parsing_mode": "raw"}
    v1 = MuseTalk("unused", "v1")
    assert (v1.extra_margin, v1.expand, v1.parsing_mode) == (0, 1.5, "raw")
    assert MuseTalk("unused", "v15", parsing_mode="neck").parsing_mode == "neck"
    box, crop = (100, 100, 300, 300), (0, 0, 400, 400)
    ramp = {b: int(((m > 0) & (m < 255))[250].sum()) for b in (BLUR_OFFLINE, BLUR_REALTIME)
            for m in [blend_mask(box, crop, None, blur=b)]}
    # kernel widths 21 and 41 on a 400 px square: the soft edge of the realtime mask is twice as wide
    assert ramp[BLUR_OFFLINE] < ramp[BLUR_REALTIME]
    assert ramp[BLUR_REALTIME] >= 1.6 * ramp[BLUR_OFFLINE]


def test_offline_render_blends_with_the_offline_kernel(musetalk_model: MuseTalk, tmp_path: Path) -> None:
    from talkinghead import prepare_avatar
    from talkinghead.offline import render
    from tests.support.media import tone_on_off

    image = tmp_path / "face.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8))
    avatar = prepare_avatar(image, box=(50, 50, 150, 150), cache_dir=tmp_path)
    blurs: list[float] = []
    real = musetalk_model.prepare_faces

    def spy(av, cache_dir=None, progress=None, blur=BLUR_REALTIME):  # type: ignore[no-untyped-def]
        blurs.append(blur)
        return real(av, cache_dir=tmp_path, progress=progress, blur=blur)

    class Frames:
        def __init__(self) -> None:
            self.n = 0

        def write(self, frame: np.ndarray, audio: np.ndarray) -> None:
            self.n += 1

    musetalk_model.prepare_faces = spy  # type: ignore[method-assign]
    try:
        sink = Frames()
        render(model_with_unet(musetalk_model), avatar, tone_on_off([(0.2, True)]), sink)
    finally:
        musetalk_model.prepare_faces = real  # type: ignore[method-assign]
    assert blurs == [BLUR_OFFLINE]
    assert sink.n == 5


def model_with_unet(m: MuseTalk) -> MuseTalk:
    assert m.unet is not None  # the module's fixture loads every part
    return m


# -- video avatars play at their own speed ------------------------------------------------------------
def write_numbered_video(path: Path, fps: int, n: int) -> Path:
    """Frame i shows i in binary: 8 columns of 8 px, white for a 1 bit (robust to the codec)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        s.options = {"crf": "0", "preset": "ultrafast"}
        for i in range(n):
            img = np.zeros((64, 64, 3), np.uint8)
            for bit in range(8):
                if i >> bit & 1:
                    img[:, bit * 8:(bit + 1) * 8] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def frame_number(image: np.ndarray) -> int:
    return sum(1 << bit for bit in range(8) if image[:, bit * 8 + 2:bit * 8 + 6].mean() > 128)


@pytest.mark.parametrize("fps", [60, 30, 25, 15])
def test_video_avatar_frames_are_resampled_to_25_fps(tmp_path: Path, fps: int) -> None:
    from talkinghead import prepare_avatar

    n = 2 * fps  # two seconds
    video = write_numbered_video(tmp_path / f"a{fps}.mp4", fps, n)
    avatar = prepare_avatar(video, box=(8, 8, 56, 56), cache_dir=tmp_path)
    shown = [frame_number(f.image) for f in avatar.frames]
    want = [min(n - 1, math.floor(k * fps / 25 + 1e-9)) for k in range(50)]
    assert len(shown) in (50, 51), (fps, shown[:12])
    assert shown[:50] == want, (fps, shown[:12])


def test_an_offline_render_keeps_every_avatar_frame_and_a_live_session_ten_seconds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 12 s avatar video: a live session holds 250 frames (10 s), an offline render all 300 (as
    MuseTalk's published inference uses the whole video); beyond the offline memory bound, a clear error."""
    from talkinghead import AvatarError, prepare_avatar
    from talkinghead import avatar as avatar_module

    video = write_numbered_video(tmp_path / "long.mp4", 25, 300)
    live = prepare_avatar(video, box=(8, 8, 56, 56), cache_dir=tmp_path)
    offline = prepare_avatar(video, box=(8, 8, 56, 56), cache_dir=tmp_path, max_frames=None)
    assert len(live.frames) == 250
    assert len(offline.frames) == 300
    assert [frame_number(f.image) for f in offline.frames[250:]] == list(range(250, 256)) + list(range(44))
    monkeypatch.setattr(avatar_module, "OFFLINE_MAX_BYTES", 64 * 64 * 3 * 100)
    with pytest.raises(AvatarError, match=r"more than 1 MB of decoded 64x64 frames \(101 so far"):
        prepare_avatar(video, box=(8, 8, 56, 56), cache_dir=tmp_path / "other", max_frames=None)


def test_energy_backend_animates_every_frame_of_a_video_avatar(tmp_path: Path) -> None:
    from talkinghead import EnergyLipSync, prepare_avatar

    video = write_numbered_video(tmp_path / "v.mp4", 25, 6)
    avatar = prepare_avatar(video, box=(8, 8, 56, 56), cache_dir=tmp_path)
    backend = EnergyLipSync(avatar)
    levels = [frame_number(backend.render(0.0)) for _ in range(14)]
    assert levels == [0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0, 0, 1]  # ping-pong, as MuseTalk plays avatars
    assert not np.array_equal(backend.render(0.9), avatar.frames[2].image)  # and the mouth still opens


# -- silence: the model runs around speech; both switches are cross-faded -----------------------------
def test_model_runs_around_speech() -> None:
    voiced = [False] * 10 + [True] * 3 + [False] * 20 + [True] * 2
    run = model_frames(voiced, margin=5)
    assert [i for i, r in enumerate(run) if r] == [*range(5, 18), *range(28, 35)]
    assert model_frames(voiced, margin=5, always=True) == [True] * len(voiced)
    assert model_frames([False] * 4, margin=5) == [False] * 4


def test_crossfades_both_ways() -> None:
    idle, gen = np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 200, np.uint8)
    fade = Crossfade(frames=3)
    out = [fade.idle(idle), fade.idle(idle)]
    out += [fade.spoken(gen, idle) for _ in range(5)]
    out += [fade.idle(idle) for _ in range(5)]
    assert [int(f[0, 0, 0]) for f in out] == [0, 0, 50, 100, 150, 200, 200, 150, 100, 50, 0, 0]
    start = Crossfade(frames=3)  # speech from the very first frame: nothing to fade from
    assert int(start.spoken(gen, idle)[0, 0, 0]) == 200


def test_live_block_renders_ahead_of_speech(musetalk_model: MuseTalk, tmp_path: Path) -> None:
    """The session hands a block its lookahead's voicing: the frames just before an onset are
    generated (the mouth opens before the sound), faded in from the avatar's own frames."""
    from concurrent.futures import Future

    from talkinghead.live import MuseTalkLive

    frame = np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)
    faces = [musetalk_model.prepare_face(frame, (50, 50, 150, 150))]
    sent: list[int] = []

    def submit(jobs: list) -> Future:  # type: ignore[type-arg]
        sent.append(len(jobs))
        f: Future = Future()  # type: ignore[type-arg]
        f.set_result([np.full((256, 256, 3), 255, np.uint8)] * len(jobs))
        return f

    live = MuseTalkLive(musetalk_model, faces, submit, block=4, timeout=5.0, lookahead=5)
    quiet, loud = np.zeros(640, np.float32), np.full(640, 0.3, np.float32)
    # block 1: silent, but speech starts 3 frames after it: its last frame (within 5) is generated
    frames = live.render_block([quiet] * 4, [False] * 4 + [False, False, True, True, True],
                               [quiet, quiet, loud, loud, loud])
    assert live.generated == 3
    assert sent == [3]
    assert np.array_equal(frames[0], frame)
    assert not np.array_equal(frames[1], frame)
    change = [int(np.abs(f.astype(int) - frame).sum()) for f in frames]
    assert 0 == change[0] < change[1] < change[2] < change[3]  # fading in: 1/4, 2/4, 3/4


def _constant_submit(jobs: list, delay: float = 0.0):  # type: ignore[no-untyped-def, type-arg]
    """A slot whose UNet answers every job with one white face (after `delay` seconds)."""
    import time
    from concurrent.futures import Future

    time.sleep(delay)
    f: Future = Future()  # type: ignore[type-arg]
    f.set_result([np.full((256, 256, 3), 255, np.uint8)] * len(jobs))
    return f


def test_pushed_speech_after_fillers_fades_in_on_silent_frames(musetalk_model: MuseTalk) -> None:
    """Pushed audio that starts after a pause: while its first block and lookahead come in, the session
    shows filler frames; the last of them see the spurt ahead, so the model renders them and the
    cross-fade into the generated face ends before the first spoken frame (it used to land on the
    first three spoken frames: the mouth half there as the voice began).

    The slot takes 30 ms per frame, the avatar's own frames next to nothing: the margin of fillers is
    sized from the model's cost, so every frame is written when due (sized from every frame's cost, the
    idle ones made it 3 frames, and the fillers the model renders and the first block came ~150 ms late)."""
    import time

    from talkinghead import PushAudio, TalkSession
    from talkinghead.live import MuseTalkLive
    from tests.support.media import FrameSink

    frame = np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)
    face = musetalk_model.prepare_face(frame, (50, 50, 150, 150))
    spoken = MuseTalk.paste(face, np.full((256, 256, 3), 255, np.uint8))
    live = MuseTalkLive(musetalk_model, [face], lambda jobs: _constant_submit(jobs, 0.03 * len(jobs)), block=4,
                        timeout=5.0, lookahead=5)
    push, sink = PushAudio(), FrameSink()
    session = TalkSession("pause-then-speech", live, push, sink, realtime=True)
    session.start()
    time.sleep(0.4)  # nothing pushed yet: the avatar idles
    t0 = time.monotonic()
    loud = (np.full(640, 0.3) * 32767).astype("<i2").tobytes()
    for k in range(25):
        push.push_pcm16(loud)
        time.sleep(max(0.0, t0 + (k + 1) / 25 - time.monotonic()))
    time.sleep(0.5)
    push.close()
    assert session.wait(10), session.error
    voiced = [bool(np.abs(a).max() > 0.1) for a in sink.audio]
    first = voiced.index(True)
    assert sum(voiced) == 25
    assert first >= 10, first
    assert all(np.array_equal(sink.frames[i], spoken) for i in range(first, first + 25))  # no fade on speech
    # as offline: the model renders the SPEECH_MARGIN (5) frames before the onset, the fade takes the
    # first three of them (1/4, 2/4, 3/4) and the two before speech are generated whole
    change = [int(np.abs(f.astype(int) - frame).sum()) for f in sink.frames[first - 6:first + 1]]
    assert 0 == change[0] < change[1] < change[2] < change[3] < change[4] == change[5] == change[6], change
    assert all(np.array_equal(f, frame) for f in sink.frames[:first - 5])  # the pause itself: the avatar
    lateness = [t - (session.started_at + i / 25) for i, t in enumerate(sink.times)]
    assert session.stats.late == 0, session.snapshot()
    assert max(lateness[first - 10:first + 25]) < 0.1, [round(x, 3) for x in lateness[first - 10:first + 25]]


def test_blocks_skipped_under_overload_keep_whisper_history_and_avatar_position(musetalk_model: MuseTalk) -> None:
    """A session behind real time repeats its last frame for the blocks it cannot render; the backend
    still hears their audio and moves the avatar on, so the next rendered block gets the prompts and
    the avatar frame of its own place in time (they used to resume where the skip began)."""
    from talkinghead import TalkSession
    from talkinghead.live import MuseTalkLive
    from tests.support.media import FrameSink

    frame = np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)
    faces = [musetalk_model.prepare_face(np.roll(frame, k, 0), (50, 50, 150, 150)) for k in range(7)]
    live = MuseTalkLive(musetalk_model, faces, lambda jobs: _constant_submit(jobs, 0.3), block=4, timeout=5.0,
                        lookahead=5)
    audio = (0.3 * np.sin(np.arange(16000 * 2) / 16000 * 2 * np.pi * 220)).astype(np.float32)
    session = TalkSession("overloaded", live, iter([audio]), FrameSink(), realtime=True)
    session.start()
    assert session.wait(20), session.error
    assert session.stats.late > 0, session.snapshot()  # 300 ms per 160 ms block: behind
    assert session.stats.frames == 50
    assert live.index == 50  # every frame's place, rendered or skipped
    assert len(live.heard) == 50 * 640  # every chunk's audio in the Whisper segment


# -- audio: the exact short log-mel, and live prompts against offline ----------------------------------
def test_short_log_mel_equals_the_padded_one(musetalk_model: MuseTalk) -> None:
    rng = np.random.default_rng(2)
    for n in (0, 1, 640, 16_000 * 3 + 123):
        x = (rng.standard_normal(n) * 0.1).astype(np.float32)
        if n > 1000:
            x[n // 2 :] *= 1e-4  # a quiet half: the clamp at max - 8 matters
        ref = musetalk_model.features(x, sampling_rate=16_000, return_tensors="pt").input_features
        got = musetalk_model.log_mel(x)
        assert tuple(got.shape) == tuple(ref.shape), n
        assert float((got - ref).abs().max()) < 1e-5, n


def speech_like(seconds: float, seed: int = 0, rate: int = 16_000) -> np.ndarray:
    """A voiced source (gliding pitch, 11 harmonics) under a syllable envelope with pauses, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 0.7 * t)) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 3.7 * t + rng.uniform(0, 6)), 0, None) ** 0.7
    envelope *= np.sin(2 * np.pi * 0.3 * t) > -0.6
    return (0.2 * voice * envelope + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.mark.parametrize(("encoder", "blocks", "spans"), [
    ("musetalk_model", [4], [(0, 875)]), ("musetalk_model", [5], [(0, 875)]),
    ("musetalk_model", [3, 1, 2, 6], [(0, 875)]), ("musetalk_tiny_shape", [3, 1, 2, 6], [(0, 40), (730, 790)])],
    ids=["block4", "block5-on-the-cut", "ragged", "whisper-tiny-shape"])
def test_live_prompts_match_offline(request: pytest.FixtureRequest, encoder: str, blocks: list[int],
                                    spans: list[tuple[int, int]]) -> None:
    """Live blocks (200 ms lookahead) against the whole-file prompts of a 35 s speech-like clip
    (across a 30 s segment boundary): cosine similarity >= 0.98 for every frame. Blocks of 5 start
    exactly on the cut (frame 750), and pushed audio that runs dry makes blocks of any length: the
    first frames of the new segment must still see the old segment's last features. On the tiny
    2-layer encoder (every frame) and on one of whisper-tiny's shape (4 layers, d_model 384, what v1.5
    runs: the first 40 frames and the 2.4 s around the cut, each span's live side having heard the
    audio before it, so the test stays short)."""
    import itertools

    import torch

    from talkinghead.live import MuseTalkLive

    musetalk_model: MuseTalk = request.getfixturevalue(encoder)
    audio = speech_like(35.0)
    offline = musetalk_model.audio_prompts(audio)
    per = 640
    n = len(audio) // per
    assert n == 875
    for start, end in spans:
        live = MuseTalkLive(musetalk_model, [object()], lambda jobs: None, block=4, timeout=1.0, lookahead=5)  # type: ignore[list-item]
        live.hear(audio[: start * per])  # what it heard before the span
        got, b = [], start
        sizes = itertools.cycle(blocks)
        while b < end:
            size = min(next(sizes), end - b)
            block = audio[b * per : (b + size) * per]
            ahead = [audio[i * per : (i + 1) * per] for i in range(b + size, min(n, b + size + 5))]
            got.append(live.block_prompts(block, ahead))
            live.hear(block)
            b += size
        prompts = torch.cat(got)
        assert prompts.shape == offline[start:end].shape
        cos = torch.nn.functional.cosine_similarity(prompts.reshape(end - start, -1).float(),
                                                    offline[start:end].reshape(end - start, -1).float(), dim=1)
        assert float(cos.min()) >= 0.98, (float(cos.min()), start + int(cos.argmin()))
        if start <= 748 and end >= 754:  # the frames on the cut see what offline's see there (the same segment)
            assert float(cos[750 - start:752 - start].min()) >= 0.999, cos[748 - start:754 - start].tolist()


def test_loading_is_quiet(tiny: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """No install advice, progress bars or cast warnings from diffusers/transformers when MuseTalk
    loads (they repeated on every slot start and restart)."""
    for parts in ({"vae", "whisper"}, {"unet", "vae"}):
        MuseTalk(tiny, "v15", parts=parts).load()
    out = capfd.readouterr()
    text = out.out + out.err + caplog.text
    for noise in ("accelerate", "Loading weights", "Casting directly", "torch_dtype"):
        assert noise not in text, text


def test_missing_face_parser_is_reported_once_per_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without the BiSeNet checkpoint every load falls back to the box mask; the warning says so
    once per weights folder, not once per session and slot start."""
    from tools.make_tiny_musetalk import make

    root = make(tmp_path / "tiny")
    with caplog.at_level(logging.WARNING, logger="talkinghead.musetalk"):
        for _ in range(3):
            MuseTalk(root, "v15", parts={"vae", "whisper"}).load()
    warned = [r for r in caplog.records if "79999_iter.pth is missing" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert "jaw-mode chin coverage" in warned[0].getMessage()
