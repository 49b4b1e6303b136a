"""Synthetic scenes with exact ground truth: coloured shapes on cluttered backgrounds.

framegrid cannot download pretrained weights or datasets, so the demo model, the demo camera
and the tests all come from this one renderer. The same code draws training images (random
scenes) and test videos (shapes moving in straight lines, bouncing off the edges), and returns
the axis-aligned box of every shape in pixels, so a test can score detections against truth.

Everything here is deterministic for a given seed and never touches the network.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLASSES: tuple[str, ...] = ("circle", "square", "triangle")


@dataclass(frozen=True, slots=True)
class Shape:
    """One shape in a scene: class, centre, radius (px), rotation (rad) and BGR colour."""

    class_id: int
    cx: float
    cy: float
    radius: float
    angle: float
    color: tuple[int, int, int]

    def polygon(self) -> np.ndarray:
        """Outline as an (N, 2) float array; a circle is approximated finely."""
        name = CLASSES[self.class_id]
        if name == "circle":
            n, offset = 64, 0.0
        elif name == "square":
            n, offset = 4, math.pi / 4
        else:
            n, offset = 3, -math.pi / 2
        t = np.arange(n) * (2 * math.pi / n) + offset + self.angle
        return np.stack([self.cx + self.radius * np.cos(t), self.cy + self.radius * np.sin(t)], 1)

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Axis-aligned bounding box (x1, y1, x2, y2), clipped to the image."""
        pts = self.polygon()
        x1, y1 = pts.min(0)
        x2, y2 = pts.max(0)
        return (max(0.0, float(x1)), max(0.0, float(y1)), min(float(width), float(x2)),
                min(float(height), float(y2)))


@dataclass(frozen=True, slots=True)
class GroundTruth:
    """Truth for one rendered image: class ids and boxes in pixel coordinates."""

    class_ids: tuple[int, ...]
    boxes: tuple[tuple[float, float, float, float], ...]
    # True where the object's box touches another object's box: moving shapes cross each other,
    # and a test scores only objects in clear view (as KITTI/COCO do with occlusion flags)
    occluded: tuple[bool, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "objects": [
                {"label": CLASSES[c], "class_id": c, "box": [round(v, 2) for v in b]}
                for c, b in zip(self.class_ids, self.boxes, strict=True)
            ]
        }


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A two-colour gradient with noise and low-contrast clutter (lines, blobs)."""
    c0 = rng.integers(0, 256, 3).astype(np.float32)
    c1 = rng.integers(0, 256, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) / max(width, height)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    img += rng.normal(0, rng.uniform(2, 10), img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(2, 8))):
        col = tuple(int(v) for v in np.clip(img[0, 0].astype(int) + rng.integers(-40, 40, 3), 0, 255))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        if rng.random() < 0.5:
            cv2.line(img, p1, p2, col, int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            axes = (int(rng.integers(5, width // 4)), int(rng.integers(5, height // 4)))
            cv2.ellipse(img, p1, axes, float(rng.uniform(0, 180)), 0, 360, col, 1, cv2.LINE_AA)
    return img


def _contrasting_color(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    mean = background.reshape(-1, 3).mean(0)
    for _ in range(50):
        col = rng.integers(0, 256, 3)
        if np.abs(col - mean).sum() > 180:
            break
    return (int(col[0]), int(col[1]), int(col[2]))


def draw(image: np.ndarray, shapes: list[Shape]) -> None:
    """Draw shapes onto a BGR image in place, anti-aliased."""
    for s in shapes:
        pts = np.round(s.polygon() * 16).astype(np.int32)  # 4 fractional bits
        cv2.fillPoly(image, [pts], s.color, cv2.LINE_AA, shift=4)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def random_shapes(
    rng: np.random.Generator,
    background: np.ndarray,
    count: int,
    min_radius: float,
    max_radius: float,
) -> list[Shape]:
    """Place up to `count` shapes fully inside the image, not overlapping each other."""
    height, width = background.shape[:2]
    shapes: list[Shape] = []
    for _ in range(count * 20):
        if len(shapes) == count:
            break
        r = float(rng.uniform(min_radius, max_radius))
        s = Shape(
            class_id=int(rng.integers(0, len(CLASSES))),
            cx=float(rng.uniform(r + 2, width - r - 2)),
            cy=float(rng.uniform(r + 2, height - r - 2)),
            radius=r,
            angle=float(rng.uniform(0, 2 * math.pi)),
            color=_contrasting_color(rng, background),
        )
        box = s.box(width, height)
        if all(box_iou(box, o.box(width, height)) == 0.0 for o in shapes):
            shapes.append(s)
    return shapes


def render_image(
    seed: int, width: int = 640, height: int = 360, max_objects: int = 5
) -> tuple[np.ndarray, GroundTruth]:
    """One random training/test image and its truth."""
    rng = np.random.default_rng(seed)
    img = _background(rng, width, height)
    scale = min(width, height)
    shapes = random_shapes(rng, img, int(rng.integers(1, max_objects + 1)), scale * 0.05, scale * 0.14)
    draw(img, shapes)
    truth = GroundTruth(tuple(s.class_id for s in shapes), tuple(s.box(width, height) for s in shapes))
    return img, truth


def visible_fractions(shapes: Sequence[Shape], cover: np.ndarray) -> list[float]:
    """The fraction of each shape's area in view, the shapes drawn in order (a later one over an earlier
    one) and `cover` (1 where something in front of all of them hides the frame) over them all; the
    frame's edge hides what lies beyond it. `cover` is updated in place."""
    out = []
    for shape in reversed(shapes):  # the topmost first
        pts = shape.polygon()
        mask = np.zeros_like(cover)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
        area = 0.5 * abs(float(np.dot(pts[:, 0], np.roll(pts[:, 1], 1)) - np.dot(pts[:, 1], np.roll(pts[:, 0], 1))))
        out.append(int(np.count_nonzero(mask & (1 - cover))) / max(area, 1.0))
        cover |= mask
    return out[::-1]


def render_occluded_image(
    seed: int, width: int = 640, height: int = 360, max_objects: int = 6
) -> tuple[np.ndarray, GroundTruth]:
    """A random image of half-hidden objects and its truth: shapes over each other, across the frame's
    edge and behind bars of any colour, width and direction (a pillar, a post, a fence rail). An object
    is in the truth when at least half of it is in view (MOT's visibility rule), with the box of its
    whole outline clipped to the frame; one hidden more than that is background."""
    rng = np.random.default_rng(seed)
    img = _background(rng, width, height)
    scale = min(width, height)
    shapes = []
    for _ in range(int(rng.integers(2, max_objects + 1))):
        r = float(rng.uniform(scale * 0.05, scale * 0.14))
        shapes.append(Shape(int(rng.integers(0, len(CLASSES))), float(rng.uniform(-0.5 * r, width + 0.5 * r)),
                            float(rng.uniform(-0.5 * r, height + 0.5 * r)), r, float(rng.uniform(0, 2 * math.pi)),
                            _contrasting_color(rng, img)))
    behind = int(rng.integers(0, len(shapes) + 1))  # the bars hide the shapes drawn before them
    draw(img, shapes[:behind])
    cover = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(0, 3))):
        thick = int(rng.uniform(0.03, 0.12) * width)
        colour = _contrasting_color(rng, img) if rng.random() < 0.5 else (int(rng.integers(40, 220)),) * 3
        if rng.random() < 0.7:  # upright
            x = int(rng.integers(0, width - thick))
            x1, y1, x2, y2 = x, 0, x + thick, height
        else:
            y = int(rng.integers(0, height - thick // 2))
            x1, y1, x2, y2 = 0, y, width, y + thick // 2
        cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), colour, -1)
        cover[y1:y2, x1:x2] = 1
    draw(img, shapes[behind:])
    front = np.zeros_like(cover)
    seen = visible_fractions(shapes[behind:], front)  # in front of the bars; `front` now covers them
    seen += visible_fractions(shapes[:behind], front | cover)
    kept = [s for s, v in zip(shapes[behind:] + shapes[:behind], seen, strict=True) if v >= 0.5]
    return img, GroundTruth(tuple(s.class_id for s in kept), tuple(s.box(width, height) for s in kept))


@dataclass(frozen=True, slots=True)
class MovingScene:
    """A deterministic video scene: shapes move in straight lines and bounce off the edges.

    Frame `i` is a pure function of (seed, i), so a consumer that knows a frame's index (from its
    presentation time) can recompute the truth for it without storing anything.
    """

    seed: int
    width: int = 640
    height: int = 360
    fps: float = 15.0
    objects: int = 4
    speed: float = 1.5  # px per frame: slow enough that one frame of timing error keeps IoU high

    def _initial(self) -> tuple[np.ndarray, list[Shape], np.ndarray]:
        return _scene_initial(self)

    def _make_initial(self) -> tuple[np.ndarray, list[Shape], np.ndarray]:
        rng = np.random.default_rng(self.seed)
        bg = _background(rng, self.width, self.height)
        scale = min(self.width, self.height)
        shapes = random_shapes(rng, bg, self.objects, scale * 0.07, scale * 0.13)
        angles = rng.uniform(0, 2 * math.pi, len(shapes))
        vel = np.stack([np.cos(angles), np.sin(angles)], 1) * self.speed
        return bg, shapes, vel

    def shapes_at(self, index: int) -> list[Shape]:
        _, shapes, vel = self._initial()
        out = []
        for s, (vx, vy) in zip(shapes, vel, strict=True):
            x = _bounce(s.cx + vx * index, s.radius, self.width - s.radius)
            y = _bounce(s.cy + vy * index, s.radius, self.height - s.radius)
            out.append(Shape(s.class_id, x, y, s.radius, s.angle, s.color))
        return out

    def truth_at(self, index: int) -> GroundTruth:
        shapes = self.shapes_at(index)
        boxes = tuple(s.box(self.width, self.height) for s in shapes)
        occluded = tuple(any(box_iou(b, o) > 0 for j, o in enumerate(boxes) if j != i) for i, b in enumerate(boxes))
        return GroundTruth(tuple(s.class_id for s in shapes), boxes, occluded)

    def frames(self, count: int) -> Iterator[tuple[np.ndarray, GroundTruth]]:
        bg, _, _ = self._initial()
        for i in range(count):
            img = bg.copy()
            draw(img, self.shapes_at(i))
            yield img, self.truth_at(i)


@functools.lru_cache(maxsize=16)
def _scene_initial(scene: MovingScene) -> tuple[np.ndarray, list[Shape], np.ndarray]:
    return scene._make_initial()


def _bounce(v: float, lo: float, hi: float) -> float:
    """Reflect a coordinate moving freely back into [lo, hi] (a triangle wave)."""
    span = hi - lo
    if span <= 0:
        return lo
    t = (v - lo) % (2 * span)
    return lo + (t if t <= span else 2 * span - t)


def camera_scene(width: int, height: int, fps: float = 25.0, seed: int = 7, objects: int = 6) -> MovingScene:
    """A camera-like scene at any size: objects crossing a textured background at a speed that
    scales with the picture (about an eighth of the short side per second)."""
    return MovingScene(seed=seed, width=width, height=height, fps=fps, objects=objects,
                       speed=min(width, height) * 8.0 / fps / 60.0)


def write_video(
    path: str | Path,
    scene: MovingScene | ScriptedScene,
    seconds: float,
    crf: int = 23,
    gop_seconds: float = 1.0,
    b_frames: int = 0,
    start: int = 0,
) -> int:
    """Encode the scene as H.264 (by default no B-frames and a 1 s GOP, so RTSP clients join fast).

    Returns the number of frames written. Frame `i` has pts `(start + i) / fps` and shows the
    scene at index `start + i` (so segments written with consecutive `start`s join seamlessly,
    even at different sizes: an .ts file concatenated byte-wise is a stream that changes size).
    The container follows the suffix (.mp4, .mkv, .ts; .h264 is a raw Annex-B stream).
    """
    from fractions import Fraction

    import av  # local: keeps the renderer importable where only numpy/cv2 are needed

    count = round(seconds * scene.fps)
    rate = Fraction(scene.fps).limit_denominator(1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = scene.width, scene.height
        stream.pix_fmt = "yuv420p"
        gop = max(1, round(scene.fps * gop_seconds))
        stream.options = {
            "crf": str(crf),
            "preset": "veryfast",
            "bf": str(b_frames),
            "g": str(gop),
            # B-frames in a fixed pattern, none of them a reference (IBBP...)
            **({"x264-params": "b-pyramid=none:b-adapt=0"} if b_frames else {"tune": "zerolatency"}),
        }
        stream.codec_context.time_base = 1 / rate
        bg, _, _ = scene._initial()
        for i in range(count):
            img = bg.copy()
            draw(img, scene.shapes_at(start + i))
            if hasattr(scene, "overlay"):
                scene.overlay(img)  # a ScriptedScene's occluder, in front of the shapes
            frame = av.VideoFrame.from_ndarray(img, format="bgr24")
            frame.pts = start + i
            frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return count


@dataclass(frozen=True, slots=True)
class Actor:
    """A shape with an identity that follows waypoints (t seconds, x, y), linearly between them;
    before the first and after the last it stays where it is. A waypoint off the frame makes it
    leave (and a later one on the frame brings it back: the same identity)."""

    id: int
    class_id: int
    radius: float
    color: tuple[int, int, int]
    path: tuple[tuple[float, float, float], ...]

    def at(self, t: float) -> tuple[float, float]:
        pts = self.path
        if t <= pts[0][0]:
            return pts[0][1], pts[0][2]
        for (t0, x0, y0), (t1, x1, y1) in itertools.pairwise(pts):
            if t <= t1:
                a = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
                return x0 + a * (x1 - x0), y0 + a * (y1 - y0)
        return pts[-1][1], pts[-1][2]


@dataclass(frozen=True)
class ScriptedScene:
    """Actors on a textured background, optionally behind a static vertical bar (an occluder).

    `tracks_at(i)` is the multi-object truth of frame i: (actor id, class id, box) of each actor
    at least half visible (in the frame, not behind the bar or a later actor: MOT's usual rule).
    Written by `write_video` like a `MovingScene`.
    """

    name: str
    seed: int
    actors: tuple[Actor, ...]
    seconds: float
    width: int = 960
    height: int = 540
    fps: float = 25.0
    bar: tuple[int, int] | None = None  # x1, x2 of the occluding bar

    def _initial(self) -> tuple[np.ndarray, list[Shape], np.ndarray]:
        bg = _background(np.random.default_rng(self.seed), self.width, self.height)
        return bg, [], np.zeros((0, 2))

    def shapes_at(self, index: int) -> list[Shape]:
        t = index / self.fps
        out = []
        for a in self.actors:
            x, y = a.at(t)
            out.append(Shape(a.class_id, x, y, a.radius, 0.0, a.color))
        return out

    def overlay(self, image: np.ndarray) -> None:
        if self.bar is not None:
            cv2.rectangle(image, (self.bar[0], 0), (self.bar[1], self.height), (128, 128, 128), -1)

    def tracks_at(self, index: int) -> list[tuple[int, int, tuple[float, float, float, float]]]:
        """(actor id, class id, box clipped to the frame) of each actor at least half visible: MOT's
        visibility rule, counted in pixels of its shape that neither the frame edge, the bar nor an
        actor drawn over it hides."""
        shapes = self.shapes_at(index)
        cover = np.zeros((self.height, self.width), np.uint8)
        if self.bar is not None:
            cover[:, self.bar[0] : self.bar[1]] = 1
        seen = visible_fractions(shapes, cover)
        return sorted((a.id, a.class_id, shape.box(self.width, self.height))
                      for a, shape, v in zip(self.actors, shapes, seen, strict=True) if v >= 0.5)


def tracking_scenes(seconds: float = 10.0) -> list[ScriptedScene]:
    """The four tracking situations, each its own scene: crossing paths, occlusion by a static bar,
    stop and go, leaving and re-entering (960x540 at 25 fps)."""
    colors = [(40, 40, 230), (40, 200, 40), (230, 60, 40), (30, 200, 230)]
    s = seconds
    return [
        ScriptedScene(
            "crossing",
            31,
            (
                Actor(1, 0, 40, colors[0], ((0, 80, 250), (s, 880, 290))),
                Actor(2, 1, 40, colors[1], ((0, 880, 250), (s, 80, 290))),
                Actor(3, 2, 45, colors[2], ((0, 480, 80), (s, 480, 460))),
            ),
            s,
        ),
        ScriptedScene(
            "occlusion",
            32,
            (
                Actor(1, 0, 40, colors[0], ((0, 80, 180), (s, 880, 180))),
                Actor(2, 2, 45, colors[3], ((0, 880, 380), (s, 80, 380))),
            ),
            s,
            bar=(450, 520),
        ),
        ScriptedScene(
            "stop_go",
            33,
            (
                Actor(1, 1, 40, colors[1], ((0, 100, 270), (s * 0.3, 400, 270), (s * 0.6, 400, 270), (s, 860, 270))),
                Actor(2, 0, 40, colors[2], ((0, 700, 100), (s * 0.4, 700, 300), (s * 0.7, 700, 300), (s, 700, 460))),
            ),
            s,
        ),
        ScriptedScene(
            "leave_reenter",
            34,
            (
                Actor(
                    1,
                    2,
                    45,
                    colors[0],
                    ((0, 500, 200), (s * 0.3, 1040, 200), (s * 0.5, 1040, 300), (s * 0.8, 600, 300), (s, 500, 300)),
                ),
                Actor(2, 1, 40, colors[3], ((0, 200, 420), (s, 760, 420))),
            ),
            s,
        ),
    ]


def held_out_scene(seed: int, seconds: float = 16.0, width: int = 1280, height: int = 720) -> ScriptedScene:
    """A random tracking scene for measuring, never for tuning: 7-11 actors of the three classes (pairs
    of one class crossing each other), a pillar, stops, exits and re-entries, at camera speeds (60-220
    px/s). Each `seed` is its own layout; the scenes the tracker's settings were chosen on are
    `tracking_scenes`."""
    rng = np.random.default_rng(seed)
    margin = 60.0
    bar_w = int(rng.integers(60, 111))
    bar_x = int(rng.uniform(0.3, 0.6) * width)
    bg = _background(np.random.default_rng(seed), width, height)  # the scene's own background (`_initial`)
    n = int(rng.integers(7, 12))
    hues = rng.permutation(12)[:n] * 15  # OpenCV hue: 0-179
    mean = bg.reshape(-1, 3).mean(0)

    def colour(i: int) -> tuple[int, int, int]:
        for value in (235, 150, 255, 90):
            hsv = np.array([[[hues[i], int(rng.integers(170, 256)), value]]], np.uint8)
            bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(int)
            if np.abs(bgr - mean).sum() > 150:
                break
        return (int(bgr[0]), int(bgr[1]), int(bgr[2]))

    def inside() -> np.ndarray:
        return np.array([rng.uniform(margin * 2, width - margin * 2), rng.uniform(margin * 2, height - margin * 2)])

    def outside(near: np.ndarray, r: float) -> np.ndarray:
        """The point just off the frame's nearest edge (or a random one) from `near`."""
        edge = int(rng.integers(0, 4))
        x, y = float(near[0]), float(near[1])
        return np.array([(-r - 5, y), (width + r + 5, y), (x, -r - 5), (x, height + r + 5)][edge])

    def leg(path: list[tuple[float, float, float]], to: np.ndarray, speed: float) -> None:
        t, x, y = path[-1]
        path.append((t + float(np.hypot(to[0] - x, to[1] - y)) / speed, float(to[0]), float(to[1])))

    actors: list[Actor] = []
    classes = [int(c) for c in rng.integers(0, 3, n)]
    kinds = ["cross", "cross", "cross", "cross", *rng.choice(["stop", "reenter", "wander"], n - 4).tolist()]
    classes[1] = classes[0]
    classes[3] = classes[2]  # two pairs of one class that cross each other
    pair_meet: dict[int, tuple[np.ndarray, float, np.ndarray]] = {}
    for i in range(n):
        r = float(rng.uniform(28, 48))
        speed = float(rng.uniform(60, 220))
        start = float(rng.uniform(0, seconds * 0.3))
        path: list[tuple[float, float, float]]
        if kinds[i] == "cross":
            if i % 2 == 0:
                meet, at = inside(), float(rng.uniform(seconds * 0.3, seconds * 0.7))
                direction = rng.normal(size=2)
                pair_meet[i] = (meet, at, direction / np.linalg.norm(direction))
            meet, at, d = pair_meet[i - i % 2]
            if i % 2:  # from the other side, at an angle
                a = float(rng.uniform(-0.6, 0.6))
                d = -np.array([d[0] * math.cos(a) - d[1] * math.sin(a), d[0] * math.sin(a) + d[1] * math.cos(a)])
            before, after = meet - d * speed * at, meet + d * speed * (seconds - at)
            path = [(0.0, float(before[0]), float(before[1])), (at, float(meet[0]), float(meet[1])),
                    (seconds, float(after[0]), float(after[1]))]
        else:
            first = inside()
            ox, oy = (float(v) for v in outside(first, r))
            path = [(start, ox, oy)]
            leg(path, first, speed)
            if kinds[i] == "stop":
                t, x, y = path[-1]
                path.append((t + float(rng.uniform(1.0, 3.0)), x, y))
                leg(path, inside(), speed)
            elif kinds[i] == "reenter":
                t, x, y = path[-1]
                gone = outside(np.array([x, y]), r)
                leg(path, gone, speed)
                t, x, y = path[-1]
                path.append((t + float(rng.uniform(1.0, 3.0)), x, y))  # off the frame for a while, then back
                leg(path, inside(), speed)
            else:
                for _ in range(2):
                    leg(path, inside(), speed)
            leg(path, outside(np.array(path[-1][1:]), r), speed)
        actors.append(Actor(i + 1, classes[i], r, colour(i), tuple(path)))
    return ScriptedScene(f"held-out-{seed}", seed, tuple(actors), seconds, width, height, bar=(bar_x, bar_x + bar_w))
