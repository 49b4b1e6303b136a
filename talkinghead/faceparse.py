"""Face parsing for MuseTalk's blend mask: BiSeNet (ResNet-18 context path), 19 CelebAMask-HQ classes.

The network is written here so that the published checkpoint MuseTalk uses
(`face-parse-bisent/79999_iter.pth`) loads by its parameter names. It runs once per avatar frame
at preparation, never per generated frame. The image is parsed at 512x512 and the labels become
a 0/255 mask by one of MuseTalk's parsing modes (`face_mask`), resized back with bicubic
interpolation as upstream does:

* `raw` (v1.0): skin, mouth and both lips (classes 1, 11, 12, 13);
* `jaw` (v1.5's default): the skin dilated downward with a cone-shaped kernel (so the moving chin
  is covered), then eroded with a flat ellipse outside a band of +-`cheek_width` px around the
  centre (so the mask does not reach the cheeks' edges), without the nose (10), plus mouth and lips;
* `neck`: `raw` plus the neck (14).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .defaults import CHEEK_WIDTH

FACE_CLASSES = (1, 11, 12, 13)  # skin, mouth, upper lip, lower lip
SKIN, NOSE, NECK = 1, 10, 14
MOUTH_AND_LIPS = (11, 12, 13)
MODES = ("raw", "jaw", "neck")
CHECKPOINT = "face-parse-bisent/79999_iter.pth"
INPUT = 512
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def build_bisenet(n_classes: int = 19) -> Any:
    """The BiSeNet module tree (names match the published checkpoint)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ConvBNReLU(nn.Module):
        def __init__(self, cin: int, cout: int, ks: int = 3, stride: int = 1, padding: int = 1) -> None:
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, ks, stride, padding, bias=False)
            self.bn = nn.BatchNorm2d(cout)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.bn(self.conv(x)))

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                               if cin != cout or stride != 1 else None)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            short = x if self.downsample is None else self.downsample(x)
            return F.relu(out + short)

    def layer(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))

    class Resnet18(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = layer(64, 64, 1)
            self.layer2 = layer(64, 128, 2)
            self.layer3 = layer(128, 256, 2)
            self.layer4 = layer(256, 512, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
            feat8 = self.layer2(self.layer1(x))
            feat16 = self.layer3(feat8)
            return feat8, feat16, self.layer4(feat16)

    class AttentionRefinement(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.conv = ConvBNReLU(cin, cout)
            self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
            self.bn_atten = nn.BatchNorm2d(cout)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            feat = self.conv(x)
            atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.avg_pool2d(feat, feat.shape[2:]))))
            return feat * atten

    class ContextPath(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.resnet = Resnet18()
            self.arm16 = AttentionRefinement(256, 128)
            self.arm32 = AttentionRefinement(512, 128)
            self.conv_head32 = ConvBNReLU(128, 128)
            self.conv_head16 = ConvBNReLU(128, 128)
            self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            feat8, feat16, feat32 = self.resnet(x)
            avg = self.conv_avg(F.avg_pool2d(feat32, feat32.shape[2:]))
            up32 = F.interpolate(avg, feat32.shape[2:], mode="nearest")
            s32 = self.arm32(feat32) + up32
            h32 = self.conv_head32(F.interpolate(s32, feat16.shape[2:], mode="nearest"))
            s16 = self.arm16(feat16) + h32
            h16 = self.conv_head16(F.interpolate(s16, feat8.shape[2:], mode="nearest"))
            return feat8, h16

    class FeatureFusion(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.convblk = ConvBNReLU(cin, cout, ks=1, padding=0)
            self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
            self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

        def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
            feat = self.convblk(torch.cat([fsp, fcp], dim=1))
            atten = torch.sigmoid(self.conv2(F.relu(self.conv1(F.avg_pool2d(feat, feat.shape[2:])))))
            return feat * atten + feat

    class Output(nn.Module):
        def __init__(self, cin: int, mid: int, n: int) -> None:
            super().__init__()
            self.conv = ConvBNReLU(cin, mid)
            self.conv_out = nn.Conv2d(mid, n, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv_out(self.conv(x))

    class BiSeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cp = ContextPath()
            self.ffm = FeatureFusion(256, 256)
            self.conv_out = Output(256, 256, n_classes)
            self.conv_out16 = Output(128, 64, n_classes)  # training heads: in the checkpoint, unused here
            self.conv_out32 = Output(128, 64, n_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            feat8, cp8 = self.cp(x)
            out = self.conv_out(self.ffm(feat8, cp8))
            return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)

    return BiSeNet()


def cone_kernel(cone_height: int = 21, tail_height: int = 12) -> np.ndarray:
    """v1.5's jaw dilation kernel: the lower half of a cone widening downward, then a column of its
    base width. Dilating with it grows the skin downward much more than sideways (the chin)."""
    size = cone_height + tail_height
    kernel = np.zeros((size, size), np.uint8)
    centre = size // 2
    for row in range(cone_height // 2, cone_height):
        half = row - cone_height // 2  # the row is 2 * half + 1 wide
        kernel[row, centre - half:centre + half + 1] = 1
    base = int(kernel[cone_height - 1].sum())
    kernel[cone_height:, max(0, centre - base // 2):min(size, centre + base // 2 + 1)] = 1
    return kernel


def cheek_mask(cheek_width: int = CHEEK_WIDTH, size: int = INPUT) -> np.ndarray:
    """255 outside the central band of +-`cheek_width` px (the cheeks, where jaw mode erodes), 0 inside."""
    mask = np.full((size, size), 255, np.uint8)
    centre = size // 2
    mask[:, max(0, centre - cheek_width + 1):centre + cheek_width] = 0
    return mask


def face_mask(labels: np.ndarray, mode: str = "jaw", cheek_width: int = CHEEK_WIDTH) -> np.ndarray:
    """MuseTalk's blend mask (0/255) from a 512x512 BiSeNet label map, by parsing mode (see above)."""
    if mode == "raw":
        return np.isin(labels, FACE_CLASSES).astype(np.uint8) * 255
    if mode == "neck":
        return np.isin(labels, (*FACE_CLASSES, NECK)).astype(np.uint8) * 255
    if mode != "jaw":
        raise ValueError(f"unknown parsing mode {mode!r} (one of {', '.join(MODES)})")
    skin = (labels == SKIN).astype(np.uint8) * 255
    dilated = cv2.dilate(skin, cone_kernel(), iterations=1)
    eroded = cv2.erode(dilated, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3)), iterations=2)
    cheeks = cheek_mask(cheek_width, labels.shape[0])
    region = cv2.bitwise_or(cv2.bitwise_and(eroded, cheeks), cv2.bitwise_and(dilated, cv2.bitwise_not(cheeks)))
    keep = ((region == 255) & (labels != NOSE)) | np.isin(labels, MOUTH_AND_LIPS)
    return keep.astype(np.uint8) * 255


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """The 512x512 mask back to the parsed image's size, bicubic as upstream (PIL's default resize)."""
    from PIL import Image

    return np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.BICUBIC))


class FaceParser:
    """Loads `79999_iter.pth`; called on a BGR image it returns the blend mask (0/255, image-sized)
    of the parsing mode it was made with."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu", mode: str = "jaw", cheek_width: int = CHEEK_WIDTH
                 ) -> None:
        import torch

        if mode not in MODES:
            raise ValueError(f"unknown parsing mode {mode!r} (one of {', '.join(MODES)})")
        self.device = device
        self.mode = mode
        self.cheek_width = cheek_width
        net = build_bisenet()
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        self.net = net.to(device).eval()

    def labels(self, image_bgr: np.ndarray) -> np.ndarray:
        """The 512x512 class map (the image resized bilinearly, as PIL does upstream)."""
        import torch
        from PIL import Image

        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(image_bgr[..., ::-1])).resize((INPUT, INPUT),
                                                                                          Image.Resampling.BILINEAR))
        x = torch.from_numpy(((rgb.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1))[None]
        with torch.inference_mode():
            return self.net(x.to(self.device)).argmax(1)[0].cpu().numpy()

    def __call__(self, image_bgr: np.ndarray) -> np.ndarray:
        h, w = image_bgr.shape[:2]
        return resize_mask(face_mask(self.labels(image_bgr), self.mode, self.cheek_width), w, h)
