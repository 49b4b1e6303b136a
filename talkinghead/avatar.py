"""Avatars: the face to animate, found once and cached.

An avatar is a photo or a short video (MuseTalk's avatars are videos: their frames play in
ping-pong order, forward then backward, so the loop has no jump). `prepare_avatar(path, ...)`
finds the face in every frame with dlib's HOG detector and its 68-point landmark
model (shipped by the `face-recognition-models` package: nothing is downloaded at run time),
then applies MuseTalk's crop rule: the box spans the landmarks horizontally and, vertically,
from the chin up to the chin's mirror image above the nose (landmark 29); v1.5 extends the
bottom by `extra_margin` pixels. A manual `box` overrides detection. A video frame where no
face is found borrows the box of the nearest frame that has one. The result (per frame: box,
landmarks, mouth region) is cached on disk keyed by the file's content and the parameters.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from streams import MissingExtra, default_state_dir, require
from streams.disk import disk_state

log = logging.getLogger(__name__)

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
    sequence: tuple[Avatar, ...] = ()  # a video avatar's frames (this one is the first); () for a photo
    key: str = ""  # content + parameters digest: what caches derived from the avatar are keyed by

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[0])

    @property
    def frames(self) -> tuple[Avatar, ...]:
        """Every frame of the avatar in playing order (one for a photo)."""
        return self.sequence or (self,)


@dataclass(frozen=True)
class _Cached:
    box: tuple[int, int, int, int]
    landmarks: list[list[float]] | None
    mouth: tuple[int, int, int, int]


def landmark_model_path() -> Path:
    spec = importlib.util.find_spec(LANDMARKS_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingExtra(LANDMARKS_PACKAGE, "talk", "finding a face (avatar landmarks)")
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
    dlib = require("dlib", "talk", "finding a face (avatar landmarks)")
    model = landmark_model_path()  # both checked before any work
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    faces = dlib.get_frontal_face_detector()(rgb, 1)
    if not faces:
        raise AvatarError(f"avatar {name}: no face found in the image; use a frontal photo or set `box` "
                          "(x1, y1, x2, y2) in the avatar config")
    face = max(faces, key=lambda r: r.width() * r.height())
    shape = dlib.shape_predictor(str(model))(rgb, face)
    return np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float32)


def _mouth_from_box(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    return x1 + w // 4, y1 + int(h * 0.62), x2 - w // 4, y1 + int(h * 0.85)


VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")


def write_cache(cache: Path, write: Callable[[Path], object], what: str) -> None:
    """Write an avatar cache file through a temporary beside it. A cache that cannot be written costs
    the next start the work it saves, nothing else: a full disk is the `avatar cache` writer's state
    (stats, /metrics), any other error a warning; the session or job goes on either way."""
    state = disk_state("avatar cache")
    tmp = cache.with_name(f".{cache.name}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        tmp.replace(cache)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if not state.failed(exc, str(cache)):
            log.warning("%s not written: %s", what, exc)
    else:
        state.wrote()


LIVE_MAX_FRAMES = 250  # a live session's avatar video: 10 s at 25 fps, held in memory while it runs
OFFLINE_MAX_BYTES = 4 << 30  # an offline render uses every frame, up to this much decoded video


def prepare_avatar(image_path: str | Path, name: str | None = None, box: tuple[int, int, int, int] | None = None,
                   extra_margin: int = 10, cache_dir: Path | None = None, max_frames: int | None = LIVE_MAX_FRAMES,
                   progress: Callable[[int, int], None] | None = None) -> Avatar:
    """Load the photo or video, find (or take) the face box per frame, and cache the result keyed by its inputs.

    A video keeps at most `max_frames` frames (live sessions: 10 s at 25 fps, since a session holds
    them, and MuseTalk's latents, for as long as it runs); None (offline renders, as MuseTalk's
    published inference does): every frame, and a clear error beyond `OFFLINE_MAX_BYTES` decoded.
    `progress(done, total)` is called per frame while faces are searched.
    """
    path = Path(image_path)
    name = name or path.stem
    if not path.is_file():
        raise AvatarError(f"avatar {name}: image not found: {path}")
    data = path.read_bytes()
    if path.suffix.lower() in VIDEO_SUFFIXES:
        images = _video_frames(path, name, max_frames)
    else:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise AvatarError(f"avatar {name}: {path} is not an image OpenCV can read")
        images = [image]
    _h, _w = images[0].shape[:2]
    key = hashlib.sha256(data + json.dumps([box, extra_margin, max_frames, "v3-25fps"]).encode()).hexdigest()[:16]
    cache = (cache_dir or default_state_dir() / "avatars") / f"{path.stem}.{key}.json"
    if cache.is_file():
        found = [_Cached(**c) for c in json.loads(cache.read_text())]
    else:
        found = _find_faces(images, name, box, extra_margin, progress)
        text = json.dumps([asdict(c) for c in found])
        write_cache(cache, lambda tmp: tmp.write_text(text), f"avatar {name}: face cache")
    frames = tuple(
        Avatar(name, img, tuple(c.box), None if c.landmarks is None else np.array(c.landmarks, np.float32),  # type: ignore[arg-type]
               tuple(c.mouth), key=key)  # type: ignore[arg-type]
        for img, c in zip(images, found, strict=True))
    first = frames[0]
    if len(frames) == 1:
        return first
    return Avatar(name, first.image, first.box, first.landmarks, first.mouth, sequence=frames, key=key)


def _video_frames(path: Path, name: str, limit: int | None, fps: int = 25) -> list[np.ndarray]:
    """The video's frames resampled to `fps` by their timestamps (a 30 or 60 fps avatar plays at its
    own speed in a 25 fps session: frames are skipped or, below 25 fps, shown twice); at most
    `limit` (None: all, up to `OFFLINE_MAX_BYTES`)."""
    import av

    max_frames = limit if limit is not None else 1 << 62
    images: list[np.ndarray] = []
    held: np.ndarray | None = None
    start: float | None = None
    try:
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or fps)
            for n, vf in enumerate(c.decode(stream)):
                t = vf.time if vf.time is not None else n / rate
                start = t if start is None else start
                t -= start
                # every output instant before this frame's time shows the frame before it
                while held is not None and len(images) < max_frames and len(images) / fps < t - 1e-6:
                    images.append(held)
                held = vf.to_ndarray(format="bgr24")
                if len(images) >= max_frames:
                    break
                if limit is None and (len(images) + 1) * held.nbytes > OFFLINE_MAX_BYTES:
                    raise AvatarError(f"avatar {name}: {path} holds more than {OFFLINE_MAX_BYTES >> 20} MB of "
                                      f"decoded {held.shape[1]}x{held.shape[0]} frames ({len(images) + 1} so far "
                                      f"at 25 fps): cut it or lower its resolution")
    except (av.error.FFmpegError, OSError, IndexError) as exc:
        raise AvatarError(f"avatar {name}: {path} is not a video PyAV can read: {exc}") from exc
    if held is not None and len(images) < max_frames:
        images.append(held)  # the last frame, once
    if not images:
        raise AvatarError(f"avatar {name}: {path} has no video frames")
    return images


def _find_faces(images: list[np.ndarray], name: str, box: tuple[int, int, int, int] | None, extra_margin: int,
                progress: Callable[[int, int], None] | None) -> list[_Cached]:
    h, w = images[0].shape[:2]
    if box is not None:
        x1, y1, x2, y2 = (int(v) for v in box)
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            raise AvatarError(f"avatar {name}: box {box} is outside the {w}x{h} image")
        fbox = (x1, y1, x2, y2)
        return [_Cached(fbox, None, _mouth_from_box(fbox))] * len(images)
    found: list[_Cached | None] = []
    for i, image in enumerate(images):
        try:
            landmarks = detect_landmarks(image, name)
        except AvatarError:
            if len(images) == 1:
                raise
            found.append(None)  # borrows a neighbour's box below
        else:
            fbox = musetalk_box(landmarks, w, h, extra_margin)
            m = landmarks[48:68]
            mouth = (int(m[:, 0].min()), int(m[:, 1].min()), int(m[:, 0].max()), int(m[:, 1].max()))
            found.append(_Cached(fbox, landmarks.tolist(), mouth))
        if progress is not None:
            progress(i + 1, len(images))
    have = [i for i, c in enumerate(found) if c is not None]
    if not have:
        raise AvatarError(f"avatar {name}: no face found in any of its {len(images)} frames; use a frontal "
                          "video or set `box` (x1, y1, x2, y2) in the avatar config")
    return [c if c is not None else found[min(have, key=lambda j: abs(j - i))]  # type: ignore[misc]
            for i, c in enumerate(found)]
