"""MuseTalk inference on tiny random models of the real classes, loaded through the real loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from talkinghead import prepare_avatar
from talkinghead.musetalk import (
    MuseTalk,
    MuseTalkError,
    check_layout,
    lower_half_mask,
    ping_pong,
    positional_encoding,
    window_indices,
)


def test_missing_weights_list_every_piece(tmp_path: Path, tiny: Path) -> None:
    with pytest.raises(MuseTalkError) as err:
        check_layout(tmp_path)
    msg = str(err.value)
    for piece in ("musetalkV15/unet.pth", "musetalkV15/musetalk.json", "sd-vae", "whisper", "stabilityai/sd-vae-ft-mse",
                  "openai/whisper-tiny"):
        assert piece in msg
    partial = tmp_path / "partial"
    shutil.copytree(tiny, partial)
    (partial / "sd-vae" / "config.json").unlink()
    with pytest.raises(MuseTalkError, match=r"sd-vae/config\.json"):
        check_layout(partial)
    with pytest.raises(MuseTalkError, match=r"musetalk/pytorch_model\.bin"):
        check_layout(tiny, "v1")  # v1.0 has its own folder


def test_sizes_come_from_the_configs(musetalk_model: MuseTalk) -> None:
    assert musetalk_model.d_model == 32
    assert musetalk_model.layers == 3
    assert musetalk_model.audio_fps == 50
    assert musetalk_model.prompt_len == 10 * 3
    assert not musetalk_model.half
    assert musetalk_model.dtype.is_floating_point


def test_audio_windows_and_prompts(musetalk_model: MuseTalk) -> None:
    assert window_indices(0, 50) == range(0, 10)
    assert window_indices(1, 50) == range(2, 12)
    assert window_indices(12, 50) == range(24, 34)
    audio = (0.3 * np.sin(np.arange(2 * 16_000) / 16_000 * 2 * np.pi * 220)).astype(np.float32)
    prompts = musetalk_model.audio_prompts(audio)
    assert tuple(prompts.shape) == (50, 30, 32)  # 25 fps x 2 s, 10 feature frames x 3 layers, d_model
    # frame 0 starts in the zero padding (2 frames = 4 features of left context)
    assert float(prompts[0, :4 * 3].abs().max()) == 0.0
    assert float(prompts[0, 4 * 3:].abs().max()) > 0
    pe = positional_encoding(30, 32)
    assert pe.shape == (30, 32)
    assert pe[0, 0] == 0.0
    assert pe[0, 1] == 1.0


def test_face_latents_are_masked_first(musetalk_model: MuseTalk, face_image: Path, tmp_path: Path) -> None:
    import cv2
    import torch

    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    face = musetalk_model.prepare_face(avatar.image, avatar.box)
    assert tuple(face.latents.shape) == (1, 8, 32, 32)  # 4 + 4 channels at 256 / 8
    x1, y1, x2, y2 = avatar.box
    crop = cv2.resize(avatar.image[y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
    masked = crop.copy()
    masked[128:] = 0  # what the lower-half mask does before normalising (0 -> -1)
    lat_masked = musetalk_model.encode_crop(masked)[:, :4]
    lat_full = musetalk_model.encode_crop(crop)[:, 4:]
    assert torch.allclose(face.latents[:, :4], lat_masked, atol=1e-5)
    assert torch.allclose(face.latents[:, 4:], lat_full, atol=1e-5)
    assert not torch.allclose(face.latents[:, :4], face.latents[:, 4:])
    assert lower_half_mask(8)[:4].all()
    assert not lower_half_mask(8)[4:].any()


def test_generate_calls_unet_once_at_timestep_zero_and_pastes_inside_mask(musetalk_model: MuseTalk, face_image: Path,
                                                                           tmp_path: Path) -> None:
    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    face = musetalk_model.prepare_face(avatar.image, avatar.box)
    audio = (0.3 * np.sin(np.arange(16_000) / 16_000 * 2 * np.pi * 220)).astype(np.float32)
    prompts = musetalk_model.audio_prompts(audio)[:3]
    calls = []
    real_forward = musetalk_model.unet.forward

    def spy(sample, timestep, encoder_hidden_states, **kw):  # type: ignore[no-untyped-def]
        calls.append((tuple(sample.shape), timestep.tolist(), tuple(encoder_hidden_states.shape)))
        return real_forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kw)

    musetalk_model.unet.forward = spy
    try:
        frames = musetalk_model.generate([face] * 3, prompts)
    finally:
        musetalk_model.unet.forward = real_forward
    assert calls == [((3, 8, 32, 32), [0], (3, 30, 32))]  # one step, timestep 0, the audio as context
    cx1, cy1, cx2, cy2 = face.crop
    outside = np.ones(avatar.image.shape[:2], bool)
    region = np.zeros_like(outside)
    region[cy1:cy2, cx1:cx2] = face.mask > 0
    outside &= ~region
    for f in frames:
        assert f.shape == avatar.image.shape
        assert np.array_equal(f[outside], avatar.image[outside])  # nothing changes outside the mask
        assert not np.array_equal(f[region], avatar.image[region])  # the random model did paint inside
    assert ping_pong([1, 2, 3]) == [1, 2, 3, 3, 2, 1]


def test_offline_talk_cli_with_musetalk(tiny: Path, face_image: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main
    from tests.support.media import probe_output, tone_on_off, write_wav

    wav = write_wav(tmp_path / "speech.wav", tone_on_off([(0.6, True), (1.0, False), (0.52, True)]), 16_000)
    out = tmp_path / "talk.mp4"
    args = ["talk", "--backend", "musetalk", "--weights", str(tiny), "--avatar", str(face_image),
            "--audio", str(wav), "--out", str(out), "--batch-size", "4"]
    assert main(args) == 0  # offline, by default every frame is rendered, as upstream's inference does
    assert "53 frames (53 generated, 0 silent)" in capsys.readouterr().out
    rc = main([*args, "--render-silence", "around_speech"])
    err = capsys.readouterr()
    assert rc == 0, err.err
    n, fps, audio_s, _ = probe_output(out)
    assert fps == 25
    assert n == 53
    assert 0 <= audio_s - 2.12 <= 1024 / 16_000  # AAC frames of 1024 samples
    assert "generated" in err.out
    assert "silent" in err.out
    generated = int(err.out.split("(")[1].split(" generated")[0])
    # speech on frames 0-14 and 40-52; the model also renders the 5 frames each side of speech
    # (its window reaches 2 ahead, then a 3-frame fade): the pause's 15 middle frames skip it
    assert generated == 53 - 15, err.out
    rc = main(["talk", "--backend", "musetalk", "--weights", str(tmp_path / "none"), "--avatar", str(face_image),
               "--audio", str(wav), "--out", str(tmp_path / "x.mp4")])
    assert rc == 2
    assert "musetalkV15/unet.pth" in capsys.readouterr().err


def test_face_parsing_mask_when_its_checkpoint_is_present(tiny: Path, face_image: Path,
                                                          tmp_path: Path) -> None:
    """A face-parsing BiSeNet checkpoint (random weights, the published architecture's names) loads
    through the loader and shapes the blend mask: inside the face box, below the upper boundary."""
    import torch

    from talkinghead.faceparse import CHECKPOINT, FACE_CLASSES, FaceParser, build_bisenet
    from talkinghead.musetalk import blend_mask, geometric_mask, padded_crop

    root = tmp_path / "weights"
    shutil.copytree(tiny, root)
    torch.manual_seed(3)
    net = build_bisenet()
    for m in net.modules():  # random batch-norm statistics, so the random net's labels vary over the image
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    (root / CHECKPOINT).parent.mkdir(parents=True)
    torch.save(net.state_dict(), root / CHECKPOINT)
    names = set(net.state_dict())
    for key in ("cp.resnet.layer4.1.bn2.running_var", "cp.arm32.conv_atten.weight", "ffm.convblk.conv.weight",
                "conv_out.conv_out.weight", "conv_out16.conv.bn.weight"):
        assert key in names  # the checkpoint's parameter names
    default = MuseTalk(root, "v15", parts={"vae", "whisper"})
    default.load()
    assert default.parser is not None
    assert default.parser.mode == "jaw"
    # raw mode (skin, mouth, lips) here: the random net's skin, dilated in jaw mode, covers everything
    m = MuseTalk(root, "v15", parts={"vae", "whisper"}, parsing_mode="raw")
    m.load()
    assert m.parser is not None
    avatar = prepare_avatar(face_image, cache_dir=tmp_path)
    face = m.prepare_face(avatar.image, avatar.box)
    cx1, cy1, cx2, cy2 = face.crop
    parsed = m.parser(padded_crop(avatar.image, face.crop))
    # 0/255 at 512x512, resized back bicubically (as upstream): mostly 0 and 255
    assert parsed.shape == (cy2 - cy1, cx2 - cx1)
    assert np.isin(parsed, (0, 255)).mean() > 0.9
    assert 0 < (parsed > 0).mean() < 1
    assert len(FACE_CLASSES) == 4
    assert np.array_equal(face.mask, blend_mask(avatar.box, face.crop, parsed))  # the loader wired it in
    k = int(0.1 * face.mask.shape[1] // 2 * 2) + 1  # blur width
    assert face.mask[: int(face.mask.shape[0] * 0.5) - k].max() == 0  # nothing above the upper boundary
    geo = geometric_mask(avatar.box, face.crop)
    assert (face.mask <= geo).all()  # never outside the (blurred) face box
    # parsing shapes the mask: where the parser finds no face, nothing is blended
    no_left = np.full_like(parsed, 255)
    no_left[:, : no_left.shape[1] // 2] = 0
    shaped = blend_mask(avatar.box, face.crop, no_left)
    half = shaped.shape[1] // 2 - k
    assert shaped[:, :half].max() == 0
    assert geo[:, :half].max() > 0
    assert shaped.max() > 0
    assert FaceParser(root / CHECKPOINT)(avatar.image).shape == avatar.image.shape[:2]


def test_prompt_count_is_exact_for_whole_chunks(musetalk_model: MuseTalk) -> None:
    """One prompt per 40 ms chunk, for every length (floats would lose one at 28 chunks: 1.12 s * 25)."""
    for n in (1, 7, 28, 29, 57):
        assert len(musetalk_model.audio_prompts(np.zeros(n * 640, np.float32))) == n


def test_audio_prompts_of_any_length_have_whole_windows(musetalk_model: MuseTalk) -> None:
    """Every frame's prompt spans its whole window (2 frames before, itself, 2 after, zero-padded past
    either end), however short the audio: one frame of audio gave a 30-row prompt before, and the UNet
    call raised on the 50-row positional encoding (a live session whose pushed audio ran dry)."""
    import torch

    rng = np.random.default_rng(0)
    per = 16_000 // 25
    long = musetalk_model.audio_prompts(rng.normal(0, 0.1, 8 * per).astype(np.float32))
    for n in range(1, 7):
        prompts = musetalk_model.audio_prompts(rng.normal(0, 0.1, n * per).astype(np.float32))
        assert prompts.shape == (n, musetalk_model.prompt_len, musetalk_model.d_model), (n, tuple(prompts.shape))
        # the first frame's window starts with zero padding (nothing before the audio)
        first = prompts[0].reshape(-1, musetalk_model.layers, musetalk_model.d_model)
        assert torch.count_nonzero(first[: (musetalk_model.audio_fps // 25) * 2]) == 0
    assert long.shape[0] == 8
    latents = musetalk_model.prepare_face(np.full((256, 256, 3), 128, np.uint8), (0, 0, 256, 256)).latents
    prompts = musetalk_model.audio_prompts(np.zeros(per, np.float32))
    faces = musetalk_model.generate_faces([latents], prompts)  # one frame: no raise
    assert faces[0].shape == (256, 256, 3)
