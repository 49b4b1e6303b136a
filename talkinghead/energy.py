"""The light lip-sync backend: the avatar's mouth opens in proportion to the audio's loudness.

No learned lip shapes: loudness (dBFS of each 40 ms chunk, between a noise floor and a full
level) drives how far the lower lip and jaw are pulled down, with a dark inner mouth drawn in
the gap. It runs in real time on a CPU and needs no weights, so the talking-head demo works on a
fresh machine. For real lip shapes use the MuseTalk backend with its weights.
"""

from __future__ import annotations

import cv2
import numpy as np

from .audio import rms_db
from .avatar import Avatar


class _Mouth:
    """One avatar frame's warp geometry: the region the warp may touch and the mouth's centre and width."""

    def __init__(self, frame: Avatar) -> None:
        x1, y1, x2, y2 = frame.mouth
        fy2 = frame.box[3]
        mw, mh = x2 - x1, max(y2 - y1, 4)
        h, w = frame.image.shape[:2]
        self.image = frame.image
        # around the mouth, down to below the chin
        self.roi = (max(0, x1 - mw // 2), max(0, y1 - mh), min(w, x2 + mw // 2), min(h, fy2 + mh * 2))
        self.mouth_w = mw
        self.cy = (y1 + y2) / 2
        self.cx = (x1 + x2) / 2
        self.chin = min(h - 1, fy2 + mh)


class EnergyLipSync:
    """Renders one frame per 40 ms audio chunk; smoothing state lives in the caller (per session).

    A video avatar plays in MuseTalk's ping-pong order, one avatar frame per rendered frame, each
    warped with its own mouth geometry (a photo is its only frame)."""

    kind = "lipsync"
    name = "energy"

    def __init__(self, avatar: Avatar, floor_db: float = -45.0, full_db: float = -14.0,
                 max_open: float = 0.35) -> None:
        self.avatar = avatar
        self.floor_db = floor_db
        self.full_db = full_db
        self.max_open = max_open  # at full loudness the gap is this share of the mouth width
        mouths = [_Mouth(f) for f in avatar.frames]
        self.mouths = mouths + mouths[::-1]  # MuseTalk's ping-pong order (musetalk.ping_pong)
        self.index = 0  # frames rendered: position in the loop

    def openness(self, chunk: np.ndarray) -> float:
        """0 (closed) .. 1 (wide open) from one chunk's loudness."""
        db = rms_db(chunk)
        return float(np.clip((db - self.floor_db) / (self.full_db - self.floor_db), 0.0, 1.0))

    def render(self, openness: float) -> np.ndarray:
        """The next avatar frame with its mouth opened by `openness` (0: the frame itself)."""
        m = self.mouths[self.index % len(self.mouths)]
        self.index += 1
        img = m.image
        if openness <= 0.01:
            return img.copy()
        out = img.copy()
        rx1, ry1, rx2, ry2 = m.roi
        d = openness * self.max_open * m.mouth_w  # pixels the lower lip moves down
        ys, xs = np.mgrid[ry1:ry2, rx1:rx2].astype(np.float32)
        # vertical weight: 1 from the lip line to just below the mouth, fading to 0 at the chin
        wy = np.clip((m.chin - ys) / max(m.chin - m.cy, 1.0), 0.0, 1.0) * (ys >= m.cy)
        # horizontal weight: a smooth bump over the mouth, so cheeks stay put
        half = (rx2 - rx1) / 2
        wx = 0.5 * (1 + np.cos(np.clip((xs - m.cx) / half, -1, 1) * np.pi))
        map_y = ys - d * wy * wx
        warped = cv2.remap(img, xs, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out[ry1:ry2, rx1:rx2] = warped
        # the inner mouth, dark, in the opened gap
        axes = (max(1, int(m.mouth_w * 0.28)), max(1, int(d * 0.42)))
        centre = (int(m.cx), int(m.cy + d / 2))
        overlay = out.copy()
        cv2.ellipse(overlay, centre, axes, 0, 0, 360, (40, 25, 70), -1, cv2.LINE_AA)
        alpha = min(0.75, 0.2 + 0.55 * openness)
        cv2.addWeighted(overlay, alpha, out, 1 - alpha, 0, dst=out)
        return out
