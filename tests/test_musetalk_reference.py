"""framegrid's MuseTalk against MuseTalk v1.5's published inference, written out again here step by
step from its code (`scripts/inference.py`, `musetalk/utils/audio_processor.py`,
`musetalk/models/unet.py` and `vae.py`, `musetalk/utils/blending.py`, `musetalk/utils/preprocessing.py`,
`musetalk/utils/face_parsing/`), not from framegrid's functions, and run on the same tiny random
weights: the crop, the latents (mask, order, scaling), the Whisper windows with their padding, the
positional encoding, the UNet call and the VAE decode, BiSeNet's forward pass (on torchvision's
ResNet-18) and its parsing modes, the blend mask and the paste-back. Whisper runs in whisper-tiny's
shape (4 layers, d_model 384, random weights: the real checkpoint cannot be downloaded here).
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from talkinghead.musetalk import BLUR_OFFLINE, MuseTalk, PreparedFace, blend_mask, blend_region, positional_encoding


# -- musetalk/models/unet.py ------------------------------------------------------------------------
class ReferencePositionalEncoding(torch.nn.Module):
    def __init__(self, d_model: int = 384, max_len: int = 5000) -> None:
        super().__init__()
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, seq_len, _ = x.size()
        return x + self.pe[:, :seq_len, :]


def test_positional_encoding(musetalk_tiny_shape: MuseTalk) -> None:
    ref = ReferencePositionalEncoding(384)(torch.zeros(2, 50, 384))
    assert np.abs(positional_encoding(50, 384) - ref[0].numpy()).max() < 1e-5
    assert float((musetalk_tiny_shape._pe - ref[0]).abs().max()) < 1e-5  # what generation adds


# -- musetalk/utils/audio_processor.py --------------------------------------------------------------
def reference_prompts(model: MuseTalk, samples: np.ndarray) -> torch.Tensor:
    """`get_audio_feature` + `get_whisper_chunk` (fps 25, padding 2 + 2)."""
    sampling_rate, segment_length = 16000, 30 * 16000
    features = [model.features(samples[i:i + segment_length], return_tensors="pt", sampling_rate=sampling_rate
                               ).input_features for i in range(0, len(samples), segment_length)]
    left, right = 2, 2
    per_frame = 2 * (left + right + 1)
    whisper_feature = []
    with torch.no_grad():
        for f in features:
            hidden = model.encoder(f, output_hidden_states=True).hidden_states
            whisper_feature.append(torch.stack(hidden, dim=2))
    whole = torch.cat(whisper_feature, dim=1)
    multiplier = 50 / 25
    num_frames = math.floor((len(samples) / sampling_rate) * 25)
    actual_length = math.floor((len(samples) / sampling_rate) * 50)
    whole = whole[:, :actual_length, ...]
    pad = math.ceil(multiplier)
    whole = torch.cat([torch.zeros_like(whole[:, :pad * left]), whole, torch.zeros_like(whole[:, :pad * 3 * right])], 1)
    clips = []
    for frame_index in range(num_frames):
        audio_index = math.floor(frame_index * multiplier)
        clip = whole[:, audio_index:audio_index + per_frame]
        assert clip.shape[1] == per_frame
        clips.append(clip)
    prompts = torch.cat(clips, dim=0)  # T, 10, layers, d
    return prompts.reshape(prompts.shape[0], -1, prompts.shape[-1])  # 'b c h w -> b (c h) w'


@pytest.mark.parametrize("seconds", [2.48, 33.2], ids=["short", "two-segments"])
def test_whisper_windows_with_their_padding(musetalk_tiny_shape: MuseTalk, seconds: float) -> None:
    from tests.test_musetalk_rules import speech_like

    audio = speech_like(seconds, seed=3)
    ref = reference_prompts(musetalk_tiny_shape, audio)
    got = musetalk_tiny_shape.audio_prompts(audio)
    assert tuple(got.shape) == tuple(ref.shape) == (round(seconds * 25), 50, 384)
    assert float((got - ref).abs().max()) < 1e-3 * float(ref.abs().max())


# -- scripts/inference.py + musetalk/utils/preprocessing.py: the crop -------------------------------
def reference_box(landmarks: np.ndarray, frame_height: int, extra_margin: int = 10) -> tuple[int, ...]:
    face_land_mark = landmarks.astype(np.int32)
    half_face_coord = face_land_mark[29].copy()
    half_face_dist = np.max(face_land_mark[:, 1]) - half_face_coord[1]
    upper_bond = max(0, half_face_coord[1] - half_face_dist)
    x1, y1, x2, y2 = (np.min(face_land_mark[:, 0]), int(upper_bond), np.max(face_land_mark[:, 0]),
                      np.max(face_land_mark[:, 1]))
    y2 = min(y2 + extra_margin, frame_height)  # v1.5
    return int(x1), int(y1), int(x2), int(y2)


def test_face_crop_from_landmarks() -> None:
    from talkinghead.avatar import musetalk_box

    rng = np.random.default_rng(4)
    for k in range(200):
        w, h = 640, 480
        centre = rng.uniform([150, 60 if k % 4 else 20], [490, 400])
        lm = np.round(centre + rng.normal(0, [40, 50], (68, 2))).clip([0, 0], [w - 1, h - 1])
        assert musetalk_box(lm, w, h, 10) == reference_box(lm, h), (k, lm[29])


# -- musetalk/models/vae.py: latents, the UNet call, the decode -------------------------------------
def reference_latents(model: MuseTalk, crop_bgr: np.ndarray) -> torch.Tensor:
    """`get_latents_for_unet`: the half-masked crop's latents, then the whole crop's (a sample each)."""
    from torchvision import transforms

    def preprocess(img: np.ndarray, half_mask: bool) -> torch.Tensor:
        x = np.asarray([cv2.cvtColor(img, cv2.COLOR_BGR2RGB)]) / 255.0
        x_t = torch.squeeze(torch.FloatTensor(np.transpose(x, (3, 0, 1, 2))))
        if half_mask:
            mask = torch.zeros((256, 256))
            mask[:256 // 2, :] = 1
            x_t = x_t * (mask > 0.5)
        return transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])(x_t).unsqueeze(0)

    scaling = model.vae.config.scaling_factor
    with torch.no_grad():
        masked = scaling * model.vae.encode(preprocess(crop_bgr, True)).latent_dist.sample()
        ref = scaling * model.vae.encode(preprocess(crop_bgr, False)).latent_dist.sample()
    return torch.cat([masked, ref], dim=1)


def test_latents_of_the_crop(musetalk_tiny_shape: MuseTalk) -> None:
    rng = np.random.default_rng(5)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (360, 300, 3), np.uint8), (9, 9), 0)
    box = (70, 60, 230, 250)
    x1, y1, x2, y2 = box
    crop = cv2.resize(frame[y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
    torch.manual_seed(musetalk_tiny_shape.seed)  # upstream samples from the global generator
    ref = reference_latents(musetalk_tiny_shape, crop)
    got = musetalk_tiny_shape.prepare_face(frame, box).latents
    assert tuple(got.shape) == tuple(ref.shape) == (1, 8, 32, 32)
    assert float((got - ref).abs().max()) < 1e-4


def test_unet_call_and_vae_decode(musetalk_tiny_shape: MuseTalk) -> None:
    """`pe(whisper_batch)`, `unet.model(latents, timesteps=[0], encoder_hidden_states=...)`, then
    `decode_latents`: 1/scaling, decode, /2 + 0.5, clamp, x255 rounded, RGB to BGR."""
    m = musetalk_tiny_shape
    gen = torch.Generator().manual_seed(6)
    latents = [torch.randn(1, 8, 32, 32, generator=gen) for _ in range(3)]
    prompts = torch.randn(3, 50, 384, generator=gen)
    with torch.no_grad():
        pred = m.unet(torch.cat(latents), torch.tensor([0]),
                      encoder_hidden_states=ReferencePositionalEncoding(384)(prompts)).sample
        image = m.vae.decode((1 / m.vae.config.scaling_factor) * pred).sample
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    ref = (image * 255).round().astype("uint8")[..., ::-1]
    got = np.stack(m.generate_faces(latents, prompts))
    assert got.shape == ref.shape == (3, 256, 256, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


# -- musetalk/utils/face_parsing: BiSeNet on torchvision's ResNet-18, and the parsing modes ---------
def reference_bisenet(n_classes: int = 19) -> torch.nn.Module:
    """BiSeNet from `face_parsing/model.py`; its ResNet-18 is torchvision's (the checkpoint's names)."""
    import torch.nn.functional as F
    from torch import nn
    from torchvision.models import resnet18

    class ConvBNReLU(nn.Module):
        def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1) -> None:
            super().__init__()
            self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
            self.bn = nn.BatchNorm2d(out_chan)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.bn(self.conv(x)))

    class BiSeNetOutput(nn.Module):
        def __init__(self, in_chan: int, mid_chan: int, n: int) -> None:
            super().__init__()
            self.conv = ConvBNReLU(in_chan, mid_chan)
            self.conv_out = nn.Conv2d(mid_chan, n, kernel_size=1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv_out(self.conv(x))

    class AttentionRefinementModule(nn.Module):
        def __init__(self, in_chan: int, out_chan: int) -> None:
            super().__init__()
            self.conv = ConvBNReLU(in_chan, out_chan)
            self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
            self.bn_atten = nn.BatchNorm2d(out_chan)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            feat = self.conv(x)
            atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.avg_pool2d(feat, feat.size()[2:]))))
            return torch.mul(feat, atten)

    class ContextPath(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.resnet = resnet18(weights=None)
            self.arm16 = AttentionRefinementModule(256, 128)
            self.arm32 = AttentionRefinementModule(512, 128)
            self.conv_head32 = ConvBNReLU(128, 128)
            self.conv_head16 = ConvBNReLU(128, 128)
            self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            r = self.resnet
            x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
            feat8 = r.layer2(r.layer1(x))
            feat16 = r.layer3(feat8)
            feat32 = r.layer4(feat16)
            avg_up = F.interpolate(self.conv_avg(F.avg_pool2d(feat32, feat32.size()[2:])), feat32.size()[2:],
                                   mode="nearest")
            feat32_up = self.conv_head32(F.interpolate(self.arm32(feat32) + avg_up, feat16.size()[2:],
                                                       mode="nearest"))
            feat16_up = self.conv_head16(F.interpolate(self.arm16(feat16) + feat32_up, feat8.size()[2:],
                                                       mode="nearest"))
            return feat8, feat16_up, feat32_up

    class FeatureFusionModule(nn.Module):
        def __init__(self, in_chan: int, out_chan: int) -> None:
            super().__init__()
            self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, padding=0)
            self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, bias=False)
            self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, bias=False)

        def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
            feat = self.convblk(torch.cat([fsp, fcp], dim=1))
            atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.avg_pool2d(feat, feat.size()[2:])))))
            return torch.mul(feat, atten) + feat

    class BiSeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cp = ContextPath()
            self.ffm = FeatureFusionModule(256, 256)
            self.conv_out = BiSeNetOutput(256, 256, n_classes)
            self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
            self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            h, w = x.size()[2:]
            feat_res8, feat_cp8, feat_cp16 = self.cp(x)
            outs = (self.conv_out(self.ffm(feat_res8, feat_cp8)), self.conv_out16(feat_cp8),
                    self.conv_out32(feat_cp16))
            return tuple(F.interpolate(o, (h, w), mode="bilinear", align_corners=True) for o in outs)

    return BiSeNet()


def reference_modes(parsing: np.ndarray, mode: str, cheek_width: int = 90) -> np.ndarray:
    """`FaceParsing.__call__`'s modes on a 512x512 class map (v1.5 scripts pass cheek widths of 90)."""
    parsing = parsing.copy()
    cone_height, tail_height = 21, 12
    total = cone_height + tail_height
    kernel = np.zeros((total, total), dtype=np.uint8)
    center_x = total // 2
    for row in range(cone_height):
        if row < cone_height // 2:
            continue
        width = int(2 * (row - cone_height // 2) + 1)
        kernel[row, int(center_x - (width // 2)):int(center_x + (width // 2) + 1)] = 1
    base_width = int(kernel[cone_height - 1].sum())
    for row in range(cone_height, total):
        kernel[row, max(0, int(center_x - (base_width // 2))):min(total, int(center_x + (base_width // 2) + 1))] = 1
    cheek_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))
    cheek_mask = np.zeros((512, 512), dtype=np.uint8)
    cv2.rectangle(cheek_mask, (0, 0), (256 - cheek_width, 512), 255, -1)
    cv2.rectangle(cheek_mask, (256 + cheek_width, 0), (512, 512), 255, -1)
    if mode == "neck":
        parsing[np.isin(parsing, [1, 11, 12, 13, 14])] = 255
        parsing[np.where(parsing != 255)] = 0
    elif mode == "jaw":
        face_region = (np.isin(parsing, [1]) * 255).astype(np.uint8)
        original_dilated = cv2.dilate(face_region, kernel, iterations=1)
        eroded = cv2.erode(original_dilated, cheek_kernel, iterations=2)
        face_region = cv2.bitwise_and(eroded, cheek_mask)
        face_region = cv2.bitwise_or(face_region, cv2.bitwise_and(original_dilated, ~cheek_mask))
        parsing[(face_region == 255) & (~np.isin(parsing, [10]))] = 255
        parsing[np.isin(parsing, [11, 12, 13])] = 255
        parsing[np.where(parsing != 255)] = 0
    else:
        parsing[np.isin(parsing, [1, 11, 12, 13])] = 255
        parsing[np.where(parsing != 255)] = 0
    return parsing.astype(np.uint8)


def random_bisenet_checkpoint(path: Any) -> None:
    """framegrid's BiSeNet module tree with every weight and batch-norm statistic random (seeded)."""
    from talkinghead.faceparse import build_bisenet

    net = build_bisenet()
    gen = torch.Generator().manual_seed(7)
    state = {}
    for name, value in net.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = value
        elif name.endswith("running_var") or ("bn" in name and name.endswith("weight")):
            state[name] = torch.rand(value.shape, generator=gen) + 0.5
        else:
            fan_in = value[0].numel() if value.dim() > 1 else 1
            state[name] = torch.randn(value.shape, generator=gen) / math.sqrt(fan_in) * (0.3 if value.dim() == 1 else 1)
    torch.save(state, path)


def face_like(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), (60, 90, 140), np.uint8)
    cv2.ellipse(image, (width // 2, height // 2), (width // 3, height * 2 // 5), 0, 0, 360, (120, 150, 210), -1)
    cv2.ellipse(image, (width // 2, height * 2 // 3), (width // 8, height // 20), 0, 0, 360, (60, 50, 170), -1)
    noise = rng.integers(-20, 21, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


def test_bisenet_forward_and_parsing_modes(tmp_path: Any) -> None:
    from torchvision import transforms

    from talkinghead.faceparse import FaceParser, face_mask

    checkpoint = tmp_path / "79999_iter.pth"
    random_bisenet_checkpoint(checkpoint)
    ref_net = reference_bisenet()
    missing, unexpected = ref_net.load_state_dict(torch.load(checkpoint, weights_only=True), strict=False)
    assert set(missing) == {"cp.resnet.fc.weight", "cp.resnet.fc.bias"}, missing  # torchvision's classifier
    assert not unexpected, unexpected
    ref_net.eval()
    bgr = face_like(300, 260, 8)
    # FaceParsing.__call__ on `face_seg`'s PIL image (RGB)
    image = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])).resize((512, 512), Image.BILINEAR)
    x = transforms.Compose([transforms.ToTensor(),
                            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(image)
    with torch.no_grad():
        out = ref_net(torch.unsqueeze(x, 0))[0]
    ref_labels = out.squeeze(0).numpy().argmax(0)
    parser = FaceParser(checkpoint, mode="raw")
    labels = parser.labels(bgr)
    assert len(np.unique(ref_labels)) >= 3, np.unique(ref_labels)  # random weights, but not one class everywhere
    assert (labels == ref_labels).mean() >= 0.999
    with torch.no_grad():
        logits = parser.net(torch.unsqueeze(x, 0))
    assert float((logits - out).abs().max()) < 1e-3 * float(out.abs().max())
    # the modes, on a class map that has every class they use (random weights give few of them)
    rng = np.random.default_rng(9)
    classes = np.zeros((512, 512), np.uint8)
    cv2.ellipse(classes, (256, 240), (150, 200), 0, 0, 360, 1, -1)  # skin
    cv2.ellipse(classes, (256, 230), (25, 50), 0, 0, 360, 10, -1)  # nose
    cv2.ellipse(classes, (256, 330), (60, 20), 0, 0, 360, 12, -1)  # lips
    cv2.ellipse(classes, (256, 333), (40, 8), 0, 0, 360, 11, -1)  # mouth
    cv2.rectangle(classes, (170, 430), (340, 511), 14, -1)  # neck
    classes[rng.random(classes.shape) < 0.01] = 13
    classes = classes.astype(np.int64)  # as the network's argmax gives them
    for mode in ("raw", "jaw", "neck"):
        assert np.array_equal(face_mask(classes, mode, 90), reference_modes(classes, mode)), mode
        # and through the network, resized back as `face_seg` does (PIL's default resampling)
        seg = Image.fromarray(reference_modes(ref_labels, mode)).resize((260, 300))
        got = FaceParser(checkpoint, mode=mode)(bgr)
        assert (np.abs(got.astype(int) - np.asarray(seg).astype(int)) <= 1).mean() >= 0.999, mode


# -- musetalk/utils/blending.py: the blend mask and the paste-back ----------------------------------
def reference_get_image(image: np.ndarray, face: np.ndarray, face_box: tuple[int, int, int, int],
                        parse512: np.ndarray, upper_boundary_ratio: float = 0.5, expand: float = 1.5) -> np.ndarray:
    """`get_image` (whole-file inference), its face parser answering `parse512` (0/255, 512x512)."""
    body = Image.fromarray(np.ascontiguousarray(image[:, :, ::-1]))
    face_img = Image.fromarray(np.ascontiguousarray(face[:, :, ::-1]))
    x, y, x1, y1 = face_box
    x_c, y_c = (x + x1) // 2, (y + y1) // 2
    s = int(max(x1 - x, y1 - y) // 2 * expand)
    crop_box = [x_c - s, y_c - s, x_c + s, y_c + s]
    x_s, y_s, _, _ = crop_box
    face_large = body.crop(crop_box)
    ori_shape = face_large.size
    mask_image = Image.fromarray(parse512).resize(face_large.size)  # face_seg
    mask_small = mask_image.crop((x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    mask_image = Image.new("L", ori_shape, 0)
    mask_image.paste(mask_small, (x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    width, height = mask_image.size
    top_boundary = int(height * upper_boundary_ratio)
    modified = Image.new("L", ori_shape, 0)
    modified.paste(mask_image.crop((0, top_boundary, width, height)), (0, top_boundary))
    blur_kernel_size = int(0.05 * ori_shape[0] // 2 * 2) + 1
    mask_array = cv2.GaussianBlur(np.array(modified), (blur_kernel_size, blur_kernel_size), 0)
    face_large.paste(face_img, (x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    body.paste(face_large, crop_box[:2], Image.fromarray(mask_array))
    return np.array(body)[:, :, ::-1]


@pytest.mark.parametrize("box", [(90, 80, 250, 270), (10, 5, 170, 190)], ids=["inside", "near-the-corner"])
def test_blend_mask_and_paste_back(box: tuple[int, int, int, int]) -> None:
    frame = face_like(360, 320, 10)
    generated = face_like(256, 256, 11)[:, ::-1].copy()
    parse512 = np.zeros((512, 512), np.uint8)
    cv2.ellipse(parse512, (256, 300), (170, 190), 0, 0, 360, 255, -1)
    x1, y1, x2, y2 = box
    res_frame = cv2.resize(generated, (x2 - x1, y2 - y1))  # scripts/inference.py, before get_image
    ref = reference_get_image(frame, res_frame, box, parse512)
    region = blend_region(box, 1.5)
    parsed = np.asarray(Image.fromarray(parse512).resize((region[2] - region[0], region[3] - region[1])))
    face = PreparedFace(frame, box, None, region, blend_mask(box, region, parsed, blur=BLUR_OFFLINE))
    got = MuseTalk.paste(face, generated)
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1, diff.max()  # PIL composites in integers, framegrid rounds floats
    assert (diff > 0).mean() < 0.05
    assert np.abs(got.astype(int) - frame.astype(int)).max() > 50  # and something was pasted
