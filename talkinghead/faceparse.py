"""Face parsing for MuseTalk's blend mask: BiSeNet (ResNet-18 context path), 19 CelebAMask-HQ classes.

The network is written here so that the published checkpoint MuseTalk uses
(`face-parse-bisent/79999_iter.pth`) loads by its parameter names. It runs once per avatar frame
at preparation, never per generated frame. The mask keeps skin, mouth and both lips (classes 1,
11, 12, 13: MuseTalk's default parsing mode); `musetalk.parsed_mask` restricts it to the face box,
cuts it at the upper boundary and blurs it exactly like the geometric mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

FACE_CLASSES = (1, 11, 12, 13)  # skin, mouth, upper lip, lower lip
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


class FaceParser:
    """Loads `79999_iter.pth` and returns a 0/255 mask of skin, mouth and lips for a BGR image."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        import torch

        self.device = device
        net = build_bisenet()
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        self.net = net.to(device).eval()

    def __call__(self, image_bgr: np.ndarray) -> np.ndarray:
        import torch

        h, w = image_bgr.shape[:2]
        rgb = cv2.cvtColor(cv2.resize(image_bgr, (INPUT, INPUT), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
        x = torch.from_numpy(((rgb.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1))[None]
        with torch.inference_mode():
            labels = self.net(x.to(self.device)).argmax(1)[0].cpu().numpy()
        mask = np.isin(labels, FACE_CLASSES).astype(np.uint8) * 255
        return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
