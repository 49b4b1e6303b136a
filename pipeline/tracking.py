"""Multi-object tracking per stream: ultralytics' ByteTrack (or BoT-SORT) with a motion model in real time.

ultralytics' trackers count time in frames: one Kalman step per update, lost tracks kept for
`track_buffer` updates. framegrid tracks the frames it dispatched, which `max_fps`, keep-latest
and batching space unevenly, so a frame count is not a time. `StreamTracker` feeds the same
tracker with the real time between frames: one step is the stream's usual interval (the median
of its recent gaps, so ultralytics' per-frame tuning holds at any steady rate), a longer gap (a
dropped frame, a stall) is predicted as that many steps with process noise grown to match, and a
lost track is kept for `buffer_s` seconds whatever the frame rate. Measured with
`tools/bench_mot.py`: steps of a fixed 1/25 s at 10 fps cost 0.09 IDF1 against frame counting;
steps of the usual interval lose nothing at a steady rate.

A tracker belongs to one stream and runs on the loop, in result order. A reconnect of the stream
ends every track (a new connection is a new scene: new ids start after the old ones).
"""

from __future__ import annotations

import math
from argparse import Namespace
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from detectors import Detections

MAX_STEPS = 50.0  # the longest gap predicted, in usual intervals


@dataclass(frozen=True)
class TrackerSettings:
    type: str = "bytetrack"  # bytetrack | botsort
    high_thresh: float = 0.25  # ultralytics' defaults (cfg/trackers/bytetrack.yaml)
    low_thresh: float = 0.1
    new_track_thresh: float = 0.25
    match_thresh: float = 0.8
    buffer_s: float = 1.2  # ultralytics' 30 frames at 25 fps
    fuse_score: bool = True
    min_hits: int = 2  # updates before a track is announced


class _Boxes:
    """The detections in the shape ultralytics' trackers read (`conf`, `cls`, `xywh`, boolean indexing)."""

    def __init__(self, xyxy: np.ndarray, conf: np.ndarray, cls: np.ndarray) -> None:
        self.xyxy, self.conf, self.cls = xyxy, conf, cls
        self.xywh = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], axis=1) \
            if len(xyxy) else np.zeros((0, 4), np.float32)

    def __len__(self) -> int:
        return len(self.conf)

    def __getitem__(self, index: Any) -> _Boxes:
        return _Boxes(self.xyxy[index], self.conf[index], self.cls[index])


def _timed(base: type) -> type:
    """A tracker class whose prediction step spans `self.dt` reference intervals."""

    class Timed(base):  # type: ignore[misc,valid-type]
        dt = 1.0

        def multi_predict(self, tracks: list[Any]) -> None:
            if not tracks:
                return
            kf = self.kalman_filter
            ndim = 4
            for i in range(ndim):
                kf._motion_mat[i, ndim + i] = self.dt
            mean = np.asarray([t.mean for t in tracks])
            cov = np.asarray([t.covariance for t in tracks])
            for i, t in enumerate(tracks):
                if t.state != 1:  # TrackState.Tracked: a lost track keeps its place, not its speed
                    mean[i][7] = 0
            # the process noise of dt steps (random walk: variance grows with dt)
            scale = math.sqrt(max(self.dt, 1e-3))
            pos, vel = kf._std_weight_position, kf._std_weight_velocity
            kf._std_weight_position, kf._std_weight_velocity = pos * scale, vel * scale
            try:
                mean, cov = kf.multi_predict(mean, cov)
            finally:
                kf._std_weight_position, kf._std_weight_velocity = pos, vel
            for t, m, c in zip(tracks, mean, cov, strict=True):
                t.mean, t.covariance = m, c

        def _apply_matches(self, matches: Any, pool: list[Any], detections: list[Any], activated: list[Any],
                           refind: list[Any]) -> None:
            """ultralytics' per-track updates, with the Kalman corrections of tracked tracks done in one
            vectorised step (the same arithmetic as `KalmanFilterXYAH.update`; ByteTrack only)."""
            from ultralytics.trackers.utils.kalman_filter import KalmanFilterXYAH

            if not isinstance(self.kalman_filter, KalmanFilterXYAH) or type(self.kalman_filter) is not \
                    KalmanFilterXYAH:
                super()._apply_matches(matches, pool, detections, activated, refind)
                return
            batch = []
            for itracked, idet in matches:
                track, det = pool[itracked], detections[idet]
                if track.state == 1 and track.angle is None:  # tracked: a plain update
                    batch.append((track, det))
                else:
                    self._apply_match(track, det, activated, refind)
            if batch:
                _batched_update(self.kalman_filter, batch, self.frame_id)
                activated.extend(t for t, _ in batch)

    Timed.__name__ = f"Timed{base.__name__}"
    return Timed


def _batched_update(kf: Any, pairs: list[tuple[Any, Any]], frame_id: int) -> None:
    """`STrack.update` for many tracks at once (KalmanFilterXYAH.update without confidence)."""
    mean = np.stack([t.mean for t, _ in pairs])  # (N, 8)
    cov = np.stack([t.covariance for t, _ in pairs])  # (N, 8, 8)
    tlwh = np.stack([d.tlwh for _, d in pairs]).astype(np.float64)
    meas = tlwh.copy()
    meas[:, :2] += meas[:, 2:] / 2
    meas[:, 2] /= meas[:, 3]
    std = kf._std_weight_position * mean[:, 3]
    r = np.zeros((len(pairs), 4, 4))
    r[:, 0, 0] = r[:, 1, 1] = r[:, 3, 3] = np.square(std)
    r[:, 2, 2] = 1e-2  # (1e-1)^2
    s = cov[:, :4, :4] + r  # projected covariance
    gain = np.transpose(np.linalg.solve(s, np.transpose(cov[:, :, :4], (0, 2, 1))), (0, 2, 1))  # (N, 8, 4)
    innovation = meas - mean[:, :4]
    new_mean = mean + np.einsum("nij,nj->ni", gain, innovation)
    new_cov = cov - gain @ s @ np.transpose(gain, (0, 2, 1))
    for (track, det), m, c in zip(pairs, new_mean, new_cov, strict=True):
        track.frame_id = frame_id
        track.tracklet_len += 1
        track.mean, track.covariance = m, c
        track.state = 1
        track.is_activated = True
        track.score, track.cls, track.idx = det.score, det.cls, det.idx


def _tracker_class(kind: str) -> type:
    if kind == "botsort":
        from ultralytics.trackers.bot_sort import BOTSORT

        return _timed(BOTSORT)
    from ultralytics.trackers.byte_tracker import BYTETracker

    return _timed(BYTETracker)


class StreamTracker:
    """Track ids for one stream's results. `update(det, t)` -> one id per detection (0 = not tracked yet)."""

    def __init__(self, settings: TrackerSettings) -> None:
        self.settings = settings
        self._cls = _tracker_class(settings.type)
        self._next_first_id = 1
        self._tracker = self._make()
        self._last_t: float | None = None
        self._interval: float | None = None  # the usual time between updates (median of recent gaps)
        self._gaps: deque[float] = deque(maxlen=32)
        self._announced: set[int] = set()
        self.updates = 0

    def _make(self) -> Any:
        s = self.settings
        args = Namespace(tracker_type=s.type, track_high_thresh=s.high_thresh, track_low_thresh=s.low_thresh,
                         new_track_thresh=s.new_track_thresh, track_buffer=30, match_thresh=s.match_thresh,
                         fuse_score=s.fuse_score, gmc_method="none", proximity_thresh=0.5,
                         appearance_thresh=0.8, with_reid=False, model="auto")
        tracker = self._cls(args)
        tracker._ids = iter(range(self._next_first_id, 1 << 62))  # ids never repeat while the stream runs
        return tracker

    def restart(self) -> None:
        """End every track (the stream reconnected); the next ids follow the last one given."""
        used = max([t.track_id for t in self._all_tracks()] + [self._next_first_id - 1])
        self._next_first_id = used + 1
        self._tracker = self._make()
        self._last_t = None
        self._gaps.clear()
        self._announced.clear()

    def _all_tracks(self) -> list[Any]:
        t = self._tracker
        return [*t.tracked_stracks, *t.lost_stracks, *t.removed_stracks]

    def update(self, det: Detections, t: float) -> np.ndarray:
        """Track ids aligned with `det` (int64; 0 for a detection no confirmed track holds)."""
        tracker = self._tracker
        dt = 1.0
        if self._last_t is not None:
            gap = max(1e-3, t - self._last_t)
            if self._gaps:
                # one step is the stream's usual interval (ultralytics' per-frame tuning holds at any
                # steady rate); a longer gap (a frame dropped, a stall) is that many steps
                dt = min(MAX_STEPS, max(0.25, gap / float(np.median(self._gaps))))
            self._gaps.append(gap)
            self._interval = float(np.median(self._gaps))
        self._last_t = t
        tracker.dt = dt
        if self._interval:
            tracker.max_frames_lost = max(1, round(self.settings.buffer_s / self._interval))
        boxes = _Boxes(det.boxes.astype(np.float32), det.confidences.astype(np.float32),
                       det.class_ids.astype(np.float32))
        out = tracker.update(boxes)
        self.updates += 1
        ids = np.zeros(len(det), np.int64)
        hits = {t.track_id: t.tracklet_len for t in tracker.tracked_stracks}
        for row in out:
            track_id, idx = int(row[4]), int(row[7])
            if not 0 <= idx < len(ids):
                continue
            if track_id in self._announced or hits.get(track_id, 0) + 1 >= self.settings.min_hits:
                self._announced.add(track_id)  # once announced, a track keeps its id through gaps
                ids[idx] = track_id
        if self.updates % 256 == 0:  # forget the ids of tracks the tracker has dropped
            alive = {t.track_id for t in (*tracker.tracked_stracks, *tracker.lost_stracks)}
            self._announced &= alive
        return ids
