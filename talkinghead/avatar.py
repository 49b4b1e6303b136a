"""Avatars: the face to animate, found once and cached.

`prepare_avatar(image, ...)` finds the face with dlib's HOG detector and its 68-point landmark
model (shipped by the `face-recognition-models` package: nothing is downloaded at run time),
then applies MuseTalk's crop rule: the box spans the landmarks horizontally and, vertically,
from the chin up to the chin's mirror image above the nose (landmark 29); v1.5 extends the
bottom by `extra_margin` pixels. A manual `box` overrides detection. The result (box, landmarks,
mouth region) is cached on disk keyed by the image's content and the parameters.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from detectors.offline import default_state_dir

LANDMARKS_PACKAGE = "face_recognition_models"
LANDMARKS_FILE = "shape_predictor_68_face_landmarks.dat"


class AvatarError(Exception):
    """An avatar that cannot be prepared; the message names the image and what is wrong."""


@dataclass(frozen=True)
class Avatar:
    name: str
    image: np.ndarray  # BGR uint8, the full frame
    box: tuple[int, int, int, int]  # x1, y1, x2, y2: MuseTalk's crop box
    landmarks: np.ndarray | None  # (68, 2) float32, None with a manual box
    mouth: tuple[int, int, int, int]  # x1, y1, x2, y2 of the mouth (landmarks 48-67, or the box's lower middle)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[0])


@dataclass(frozen=True)
class _Cached:
    box: tuple[int, int, int, int]
    landmarks: list[list[float]] | None
    mouth: tuple[int, int, int, int]


def landmark_model_path() -> Path:
    spec = importlib.util.find_spec(LANDMARKS_PACKAGE)
    if spec is None or spec.origin is None:
        raise AvatarError("face landmarks need the packages dlib-bin and face-recognition-models "
                          "(pip install 'framegrid[talk]')")
    path = Path(spec.origin).parent / "models" / LANDMARKS_FILE
    if not path.is_file():
        raise AvatarError(f"face landmark model missing: {path} (reinstall face-recognition-models)")
    return path


def musetalk_box(landmarks: np.ndarray, width: int, height: int, extra_margin: int = 0) -> tuple[int, int, int, int]:
    """MuseTalk's face crop from 68 landmarks (v1.0 with extra_margin 0; v1.5 uses 10 by default)."""
    nose = landmarks[29]
    half = float(landmarks[:, 1].max() - nose[1])
    upper = max(0.0, float(nose[1]) - half)
    x1, x2 = float(landmarks[:, 0].min()), float(landmarks[:, 0].max())
    y2 = float(landmarks[:, 1].max()) + extra_margin
    box = (max(0, int(x1)), int(upper), min(width, int(x2)), min(height, int(y2)))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise AvatarError(f"degenerate face box {box}")
    return box


def detect_landmarks(image: np.ndarray, name: str) -> np.ndarray:
    """68 landmarks of the largest face in a BGR image."""
    import dlib

    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    faces = dlib.get_frontal_face_detector()(rgb, 1)
    if not faces:
        raise AvatarError(f"avatar {name}: no face found in the image; use a frontal photo or set `box` "
                          "(x1, y1, x2, y2) in the avatar config")
    face = max(faces, key=lambda r: r.width() * r.height())
    shape = dlib.shape_predictor(str(landmark_model_path()))(rgb, face)
    return np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float32)


def _mouth_from_box(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    return x1 + w // 4, y1 + int(h * 0.62), x2 - w // 4, y1 + int(h * 0.85)


def prepare_avatar(image_path: str | Path, name: str | None = None, box: tuple[int, int, int, int] | None = None,
                   extra_margin: int = 10, cache_dir: Path | None = None) -> Avatar:
    """Load the image, find (or take) the face box, and cache the result keyed by its inputs."""
    path = Path(image_path)
    name = name or path.stem
    if not path.is_file():
        raise AvatarError(f"avatar {name}: image not found: {path}")
    data = path.read_bytes()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise AvatarError(f"avatar {name}: {path} is not an image OpenCV can read")
    h, w = image.shape[:2]
    key = hashlib.sha256(data + json.dumps([box, extra_margin, "v1"]).encode()).hexdigest()[:16]
    cache = (cache_dir or default_state_dir() / "avatars") / f"{path.stem}.{key}.json"
    if cache.is_file():
        c = _Cached(**json.loads(cache.read_text()))
        lm = np.array(c.landmarks, np.float32) if c.landmarks is not None else None
        return Avatar(name, image, tuple(c.box), lm, tuple(c.mouth))  # type: ignore[arg-type]
    if box is not None:
        x1, y1, x2, y2 = (int(v) for v in box)
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            raise AvatarError(f"avatar {name}: box {box} is outside the {w}x{h} image")
        landmarks = None
        fbox = (x1, y1, x2, y2)
        mouth = _mouth_from_box(fbox)
    else:
        landmarks = detect_landmarks(image, name)
        fbox = musetalk_box(landmarks, w, h, extra_margin)
        m = landmarks[48:68]
        mouth = (int(m[:, 0].min()), int(m[:, 1].min()), int(m[:, 0].max()), int(m[:, 1].max()))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(asdict(_Cached(fbox, None if landmarks is None else landmarks.tolist(), mouth))))
    return Avatar(name, image, fbox, landmarks, mouth)
