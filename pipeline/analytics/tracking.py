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

Three additions to the association, each measured with `tools/bench_mot.py` (16 rendered scenes)
and each off with its setting at 0 (or 1), which gives ultralytics' ids exactly (tested):
- cut views (`partial_ratio`): a box much smaller than its track's usual size is an object cut by an
  occluder or the frame's edge; it is matched and corrected as the whole object aligned on its
  moving edge, so the track keeps its speed and size while the object slides out of view and takes
  the reappearing part back (the occlusion scenes: IDF1 0.49 -> 0.96 at 25 fps);
- the track's class (`class_penalty`, its score-weighted majority): a small cost on a detection of
  another class breaks ties where objects of different classes cross; a class flip of a
  half-hidden object still matches when the boxes agree;
- duplicates (`duplicate_iou`): a detection overlapping one a track took this frame (the detector's
  second class for one object) starts no track.

And appearance (`appearance`, `appearance_gate`, `reid_distance`, `reid_s`; all 0 = motion only, the
same ids as before): a colour descriptor of each box (`appearance()`, from the frame the slot
already converted) adds to the association cost, gates pairs that look unlike, finds lost tracks
again anywhere (exits and re-entries, long occlusions) and lets a young track take a lost track's
id. Measured with `tools/bench_mot.py --held-out` on random scenes never tuned on.

A tracker belongs to one stream and runs on the loop, in result order. A reconnect of the stream
ends every track (a new connection is a new scene: new ids start after the old ones).
"""

from __future__ import annotations

import math
from argparse import Namespace
from collections import deque
from typing import Any

import numpy as np

from detectors import Detections
from pipeline.config import TrackerConfig as TrackerSettings  # the defaults live in the config

MAX_STEPS = 50.0  # the longest gap predicted, in usual intervals


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


def _label(track: Any) -> float:
    """A track's class: the one its detections voted for most (score-weighted), not the last one seen."""
    return track.__dict__.get("label", track.cls)


def _vote(track: Any, det: Any) -> None:
    votes = track.__dict__.setdefault("votes", {track.cls: track.score})
    votes[det.cls] = votes.get(det.cls, 0.0) + det.score
    track.label = max(votes, key=votes.__getitem__)


def _tlwh(means: np.ndarray, xywh: bool = False) -> np.ndarray:
    """Kalman means (..., 8: cx, cy, aspect or w, h, ...; ByteTrack's XYAH, BoT-SORT's XYWH) as
    boxes (..., tlwh)."""
    w = means[..., 2] if xywh else means[..., 2] * means[..., 3]
    return np.stack([means[..., 0] - w / 2, means[..., 1] - means[..., 3] / 2, w, means[..., 3]], axis=-1)


def _full_views(pred: np.ndarray, ref: np.ndarray, det: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Detections as whole views (tlwh) for tracks predicted at `pred` (tlwh) with reference sizes
    `ref` (wh); the arrays broadcast ((N, 1, 4) with (1, M, 4) gives every pair, (N, 4) with (N, 4)
    aligned pairs). Returns the views and the mask of the sides taken as cut (..., 2).

    An object sliding behind an occluder or off the frame shows a box that shrinks from one side
    while its centre slows down; a side smaller than `ratio` x the track's reference size (the size
    of its recent whole views) is taken as cut, and its whole view keeps the reference size,
    aligned on the detected edge nearest the prediction (the edge that moves with the object)."""
    lo, size = det[..., :2], det[..., 2:]
    hi = lo + size
    cut = size < ratio * ref
    near_lo = np.abs(lo - pred[..., :2]) <= np.abs(hi - (pred[..., :2] + pred[..., 2:]))
    start = np.where(cut, np.where(near_lo, lo, hi - ref), lo)
    return np.concatenate([start, np.where(cut, ref, size)], axis=-1), cut


def _measurements(tracks: list[Any], dets: list[Any], ratio: float, pred: np.ndarray | None = None) -> np.ndarray:
    """The boxes (N, tlwh) that correct matched `tracks`: each detection's whole view for its track
    (`_full_views`), so the Kalman filter keeps the object's speed and size instead of learning a cut
    box just before the object vanishes. Each track's reference size follows a growing view quickly,
    a shrinking one slowly (a box cut a little more each frame must not drag it down) and a cut one
    more slowly still, so an object that really changed size is accepted within a second or two."""
    box = np.array([d.tlwh for d in dets], np.float64).reshape(-1, 4)
    if ratio <= 0:
        return box
    size = box[:, 2:]
    ref = np.array([t.__dict__.get("ref", s) for t, s in zip(tracks, size, strict=True)], np.float64)
    if pred is None:
        pred = np.array([t.tlwh for t in tracks], np.float64)
    view, cut = _full_views(pred, ref, box, ratio)
    ref += np.where(cut, 0.02, np.where(size >= ref, 0.3, 0.05)) * (size - ref)
    for t, r in zip(tracks, ref, strict=True):
        t.ref = r
    return view


def _cut_aware_iou(tracks: list[Any], dets: list[Any], ratio: float, xywh: bool) -> np.ndarray:
    """IoU of each track's prediction with each detection's whole view for that track (N, M)."""
    pred = _tlwh(np.array([t.mean for t in tracks], np.float64), xywh)
    ref = np.array([t.__dict__.get("ref", p[2:]) for t, p in zip(tracks, pred, strict=True)], np.float64)
    view, _ = _full_views(pred[:, None], ref[:, None], np.array([d.tlwh for d in dets], np.float64)[None], ratio)
    lt = np.maximum(pred[:, None, :2], view[..., :2])
    rb = np.minimum(pred[:, None, :2] + pred[:, None, 2:], view[..., :2] + view[..., 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    union = np.prod(pred[:, 2:], axis=1)[:, None] + np.prod(view[..., 2:], axis=2) - inter
    return inter / np.maximum(union, 1e-9)


def _buffered_iou(a: np.ndarray, b: np.ndarray, buffer: float) -> np.ndarray:
    """IoU of xyxy boxes each grown by `buffer` times its own width and height on every side
    (buffered IoU, Yang et al. 2023): boxes that a move of up to about a box size apart still overlap."""
    def grow(x: np.ndarray) -> np.ndarray:
        pad = buffer * (x[:, 2:] - x[:, :2])
        return np.concatenate([x[:, :2] - pad, x[:, 2:] + pad], axis=1)

    return _iou_matrix(grow(a), grow(b))


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a, area_b = np.prod(a[:, 2:] - a[:, :2], axis=1), np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


FIRST_REACH_PER_S = 6.25  # box sizes a once-seen track's box grows by per second of step beyond 0.04 s (1 at 5 fps)
APPEARANCE_BINS = (12, 3, 4)  # hue x saturation, then value: 40 numbers per detection
EMA = 0.9  # a track's appearance: the running mean of its whole views' (BoT-SORT's smoothing)
CROWDED = 0.15  # a box this much covered by another has a mixed look: not learned, not gated


def appearance(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """One colour descriptor per box (N, 40), unit length: a hue x saturation histogram and a value
    histogram (at a quarter of the weight: brightness changes with light, colour less) of the box's
    middle (its outer fifth on each side is mostly background for round or pointed objects),
    square-rooted so that cosine similarity is the Bhattacharyya coefficient. The
    classic hand-made re-identification cue (no model: ~0.04 ms a box with its use in matching, on
    the frame the slot already converted)."""
    import cv2

    h, w = image.shape[:2]
    out = np.zeros((len(boxes), APPEARANCE_BINS[0] * APPEARANCE_BINS[1] + APPEARANCE_BINS[2]), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        dx, dy = (x2 - x1) * 0.2, (y2 - y1) * 0.2
        a, b = int(max(0, min(w - 1, x1 + dx))), int(max(0, min(h - 1, y1 + dy)))
        c, d = int(max(a + 1, min(w, x2 - dx))), int(max(b + 1, min(h, y2 - dy)))
        crop = image[b:d, a:c]
        if crop.shape[0] * crop.shape[1] > 256:
            crop = cv2.resize(crop, (16, 16), interpolation=cv2.INTER_AREA)
        hsv = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_BGR2HSV)
        hs = cv2.calcHist([hsv], [0, 1], None, APPEARANCE_BINS[:2], [0, 180, 0, 256]).ravel()
        v = cv2.calcHist([hsv], [2], None, APPEARANCE_BINS[2:], [0, 256]).ravel()
        out[i] = np.sqrt(np.concatenate([hs, 0.25 * v]) / max(1.0, float(hsv.shape[0] * hsv.shape[1])))
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)
    return out


def _look(track: Any) -> np.ndarray | None:
    return track.__dict__.get("look")


def _sure(track: Any) -> bool:
    """Whether a track's look was learned from at least one clear view (not only mixed ones)."""
    return _look(track) is not None and track.__dict__.get("looks", 0) >= 1


def _appearance_distance(tracks: list[Any], dets: list[Any]) -> np.ndarray | None:
    """1 - cosine similarity of each track's appearance with each detection's (N, M), in [0, 1];
    None when a side has none (appearance off, or detections given without a frame)."""
    if not tracks or not dets or any(_look(d) is None for d in dets):
        return None
    dim = len(_look(dets[0]))  # type: ignore[arg-type]
    t = np.stack([lk if (lk := _look(x)) is not None else np.zeros(dim, np.float32) for x in tracks])
    known = np.array([_look(x) is not None for x in tracks])
    dist = 1.0 - np.clip(t @ np.stack([_look(d) for d in dets]).T, 0.0, 1.0)  # type: ignore[misc]
    dist[~known] = 0.0  # a track with no appearance yet costs nothing extra
    return dist


def _timed(base: type) -> type:
    """A tracker class whose prediction step spans `self.dt` reference intervals, whose association
    prefers a track's own class, and which starts no track from a duplicate of a matched detection."""

    class Timed(base):
        dt = 1.0
        class_penalty = 0.0
        duplicate_iou = 1.0
        partial_ratio = 0.0
        appearance = 0.0  # weight of the appearance distance in the association cost (0 = off)
        appearance_gate = 1.0  # a pair whose appearance distance is above this does not match
        reid_distance = 0.0  # a lost track is found again anywhere by a look this close (0 = off)
        _xyxy = np.zeros((0, 4), np.float32)

        buffer_frames = 30  # updates a lost track can be matched by position (`buffer_s`)
        first_buffer = 0.0  # a track seen once (no velocity yet) is matched by its box grown this much
        young_frames = 25  # updates a new track may still take a lost track's id by its look (1 s)
        _crowded = np.zeros(0, bool)
        lost_stracks: list[Any]

        def update(self, results: Any, looks: np.ndarray | None = None) -> np.ndarray:
            self._xyxy = results.xyxy
            self._crowded = _crowded(results.xyxy) if looks is not None else np.zeros(len(results.xyxy), bool)
            if looks is not None:  # each subset's rows reach init_track (as `feats`), with their crowding
                looks = np.concatenate([looks, self._crowded[:, None].astype(looks.dtype)], axis=1)
            pool = [*self.tracked_stracks, *self.lost_stracks]
            out = super().update(results, None, looks)
            self._keep_hidden(pool)
            if self.reid_distance and looks is not None and self.lost_stracks and self._adopt_lost():
                out = self._format_output()
            return out

        def _keep_hidden(self, pool: list[Any]) -> None:
            """ultralytics drops a lost track whose box is a tracked one's (IoU above 0.85) as a
            duplicate; it is an object hidden behind the one in front (a crossing, a crowd), so it stays
            lost, to be found when it comes out. (A younger tracked track on an older lost one still goes.)"""
            kept = {t.track_id for t in (*self.tracked_stracks, *self.lost_stracks)}
            self.lost_stracks.extend(t for t in pool if t.state == 2 and t.track_id not in kept)  # TrackState.Lost

        def _adopt_lost(self) -> bool:
            """A young track (at most `young_frames` updates old) whose look, class and size are a lost
            track's takes that track's id: the object came back in a view that first looked unlike it
            (cut by the frame's edge or an occluder) and started a track of its own. True if any did."""
            from ultralytics.trackers.utils import matching

            young = [t for t in self.tracked_stracks if t.tracklet_len <= self.young_frames and _look(t) is not None
                     and t.frame_id == self.frame_id and not t.__dict__.get("adopted") and _sure(t)]
            lost = [t for t in self.lost_stracks if _sure(t) and not t.__dict__.get("adopted")]  # no chains
            if not young or not lost:
                return False
            cost = self._reid_cost(lost, young)
            # only a whole view: a sliver at an occluder's edge is the lost track's object going out of
            # view, which its lost track (cut-aware, moving) finds again better than the sliver's track
            ref = np.array([t.__dict__.get("ref", t.tlwh[2:]) for t in lost])[:, None, :]
            size = np.array([t.tlwh[2:] for t in young])[None, :, :]
            cost[(size < 0.8 * ref).any(axis=2)] = 1.0
            matches, _, _ = matching.linear_assignment(cost, thresh=self.reid_distance)
            for i, j in matches:
                old, new = lost[i], young[j]
                new.track_id, new.adopted = old.track_id, True  # once: an id does not hop on
                new.look = old.look
                new.__dict__.setdefault("votes", {}).update(old.__dict__.get("votes", {}))
                old.mark_removed()
            gone = {id(lost[i]) for i, _ in matches}
            self.lost_stracks = [t for t in self.lost_stracks if id(t) not in gone]
            return bool(len(matches))

        def _reid_cost(self, tracks: list[Any], dets: list[Any]) -> np.ndarray:
            """Appearance distance of lost `tracks` to `dets` (detections or young tracks); 1 where the
            class or the size (area beyond 2x either way) says another object."""
            cost = _appearance_distance(tracks, dets)
            assert cost is not None
            cost[np.array([_label(t) for t in tracks])[:, None] != np.array([_label(d) for d in dets])[None, :]] = 1.0
            ref = np.array([np.prod(t.__dict__.get("ref", t.tlwh[2:])) for t in tracks])[:, None]
            area = np.array([np.prod(d.tlwh[2:]) for d in dets])[None, :]
            cost[(area > 2.0 * ref) | (area < 0.5 * ref)] = 1.0
            return cost

        def init_track(self, results: Any, img: Any = None) -> list[Any]:
            tracks = super().init_track(results, None)
            if isinstance(img, np.ndarray) and img.ndim == 2 and len(img) == len(tracks):
                for track, row in zip(tracks, img, strict=True):  # a mixed first look is a guess (0 looks)
                    track.look, track.looks = row[:-1], 0 if row[-1] else 1
            return tracks

        def _iou(self, tracks: list[Any], detections: list[Any]) -> np.ndarray:
            if self.partial_ratio > 0 and tracks and detections and tracks[0].angle is None:
                from ultralytics.trackers.utils.kalman_filter import KalmanFilterXYWH

                return _cut_aware_iou(tracks, detections, self.partial_ratio,
                                      isinstance(self.kalman_filter, KalmanFilterXYWH))
            from ultralytics.trackers.utils import matching

            return 1 - matching.iou_distance(tracks, detections)

        def get_dists(self, tracks: list[Any], detections: list[Any]) -> np.ndarray:
            """ultralytics' cost (1 - IoU, times the score), with the IoU of a cut view taken as
            its whole view's (`_full_views`), plus `class_penalty` where the detection's class is
            not the track's (objects of different classes crossing keep their ids; a class flip of
            a half-hidden object still matches when the boxes agree)."""
            if self.partial_ratio > 0 and not getattr(self.args, "with_reid", False):
                sim = self._iou(tracks, detections)
                if self.args.fuse_score and sim.size:
                    sim = sim * np.array([d.score for d in detections])[None, :]
                dists = 1 - sim
            else:
                dists = super().get_dists(tracks, detections)
            new = np.array([not t.is_activated for t in tracks], bool)
            if self.first_buffer and dists.size and new.any():
                # seen once: no velocity to predict with, so at a low detect rate a fast object's next
                # box may not overlap its first; within about a box size of it, it is the same object
                grown = _buffered_iou(np.array([tracks[i].xyxy for i in np.flatnonzero(new)], np.float64),
                                      np.array([d.xyxy for d in detections], np.float64), self.first_buffer)
                if self.args.fuse_score:
                    grown = grown * np.array([d.score for d in detections])[None, :]
                dists[new] = np.minimum(dists[new], 1 - grown)
            if self.class_penalty and dists.size:
                own = np.array([_label(t) for t in tracks])[:, None]
                dists = dists + self.class_penalty * (own != np.array([d.cls for d in detections])[None, :])
            if self.reid_distance and dists.size:  # kept past `buffer_s` for re-identification only
                stale = np.array([self.frame_id - t.end_frame > self.buffer_frames for t in tracks])
                dists[stale] = 1.0
            if self.appearance and dists.size:
                look = _appearance_distance(tracks, detections)
                if look is not None:  # only a clear view against a track's learned look (not a mixed one)
                    sure = np.array([_sure(t) for t in tracks])[:, None]
                    clear = sure & ~self._crowded[[d.idx for d in detections]][None, :]
                    dists = np.where(clear & (look > self.appearance_gate), 1.0, dists + clear * self.appearance * look)
            return dists

        def _post_first_association(self, strack_pool: list[Any], detections: list[Any], u_track: list[int],
                                    u_detection: list[int], activated: list[Any], refind: list[Any]
                                    ) -> tuple[list[int], list[int]]:
            """Re-identification: a lost track and an unmatched detection of its class and size that look
            alike (appearance distance under `reid_distance`) are one object wherever it is now (it left
            the frame and came back, or came out from behind something far from where it went in)."""
            if not self.reid_distance or not len(u_track) or not len(u_detection):
                return u_track, u_detection
            from ultralytics.trackers.utils import matching

            lost = [i for i in u_track if strack_pool[i].state != 1 and _sure(strack_pool[i])]
            tracks, dets = [strack_pool[i] for i in lost], [detections[j] for j in u_detection]
            if not lost or any(_look(d) is None for d in dets):
                return u_track, u_detection
            cost = self._reid_cost(tracks, dets)
            cost[:, self._crowded[[d.idx for d in dets]]] = 1.0  # a look mixed with another object's
            matches, _, _ = matching.linear_assignment(cost, thresh=self.reid_distance)
            if not len(matches):
                return u_track, u_detection
            for i, j in matches:  # where it is now, not where it was lost: a fresh motion state
                track, det = tracks[i], dets[j]
                track.mean, track.covariance = self.kalman_filter.initiate(track.convert_coords(det.tlwh))
            self._apply_matches(matches, tracks, dets, activated, refind)
            taken_t = {lost[i] for i, _ in matches}
            taken_d = {u_detection[j] for _, j in matches}
            return [i for i in u_track if i not in taken_t], [j for j in u_detection if j not in taken_d]

        def _init_new_tracks(self, u_detection: list[int], detections: list[Any], activated: list[Any],
                             refind: list[Any] | None = None) -> None:
            """No new track from a detection that mostly overlaps one a track took this frame: the
            detector's second class for the same object (common on half-hidden objects)."""
            held = [t.idx for t in (*activated, *(refind or ())) if t.frame_id == self.frame_id]
            if len(u_detection) and held and self.duplicate_iou < 1.0:
                new = np.array([detections[i].idx for i in u_detection])
                overlap = _iou_matrix(self._xyxy[new], self._xyxy[np.array(held)]).max(axis=1)
                u_detection = [i for i, o in zip(u_detection, overlap, strict=True) if o < self.duplicate_iou]
            super()._init_new_tracks(u_detection, detections, activated, refind)

        def _second_association(self, strack_pool: list[Any], u_track: list[int], detections_second: list[Any],
                                activated: list[Any], refind: list[Any], lost: list[Any]) -> None:
            """ultralytics' second stage (tracked tracks left over, low-score detections, IoU only,
            threshold 0.5) with the cut-aware IoU."""
            from ultralytics.trackers.utils import matching

            left = [strack_pool[i] for i in u_track if strack_pool[i].state == 1]
            unmatched = list(range(len(left)))
            if left and detections_second:
                matches, unmatched, _ = matching.linear_assignment(1 - self._iou(left, detections_second), thresh=0.5)
                self._apply_matches(matches, left, detections_second, activated, refind)
            for i in unmatched:
                left[i].mark_lost()
                lost.append(left[i])

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
            """ultralytics' per-track updates, each by its detection's whole view (`_measurements`,
            all at once) and voting for the track's class; for ByteTrack the Kalman corrections of
            tracked tracks are one vectorised step (the same arithmetic as `KalmanFilterXYAH.update`)."""
            from ultralytics.trackers.utils.kalman_filter import KalmanFilterXYAH, KalmanFilterXYWH

            pairs = [(pool[i], detections[j]) for i, j in matches]
            if not pairs:
                return
            for track, det in pairs:  # from the box as detected, before a cut view is made whole
                _learn_look(track, det, bool(self._crowded[det.idx]) if det.idx < len(self._crowded) else True)
            if self.partial_ratio > 0 and pairs[0][0].angle is None:
                means = np.array([t.mean for t, _ in pairs], np.float64)
                views = _measurements([t for t, _ in pairs], [d for _, d in pairs], self.partial_ratio,
                                      _tlwh(means, isinstance(self.kalman_filter, KalmanFilterXYWH)))
                for (_, det), view in zip(pairs, views, strict=True):
                    det._tlwh = view.astype(np.float32)
            for track, det in pairs:
                _vote(track, det)
            batch = []
            batched = type(self.kalman_filter) is KalmanFilterXYAH
            for track, det in pairs:
                if batched and track.state == 1 and track.angle is None:  # tracked: a plain update
                    batch.append((track, det))
                else:
                    self._apply_match(track, det, activated, refind)
            if batch:
                _batched_update(self.kalman_filter, batch, self.frame_id)
                activated.extend(t for t, _ in batch)

    Timed.__name__ = f"Timed{base.__name__}"
    return Timed


def _crowded(xyxy: np.ndarray) -> np.ndarray:
    """Which boxes have more than `CROWDED` of their area covered by another box: their look is mixed."""
    if len(xyxy) < 2:
        return np.zeros(len(xyxy), bool)
    lt = np.maximum(xyxy[:, None, :2], xyxy[None, :, :2])
    rb = np.minimum(xyxy[:, None, 2:], xyxy[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    np.fill_diagonal(inter, 0)
    area = np.maximum(np.prod(xyxy[:, 2:] - xyxy[:, :2], axis=1), 1e-6)
    return np.asarray(inter.max(axis=1) > CROWDED * area, bool)


def _learn_look(track: Any, det: Any, crowded: bool) -> None:
    """Fold a matched detection's appearance into its track's, unless the view is cut (an occluder
    or the frame's edge fills part of its box: `ref` is the track's whole size) or mixed with
    another object's (`crowded`). A track's first look is taken whatever it is."""
    look = _look(det)
    if look is None:
        return
    if crowded and _look(track) is not None and track.__dict__.get("looks", 0) >= 1:
        return
    own = _look(track)
    ref = track.__dict__.get("ref")
    w, h = det.tlwh[2:]  # as detected (`_measurements` replaces it with the whole view later)
    if own is not None and ref is not None and (w < 0.8 * ref[0] or h < 0.8 * ref[1]):
        return
    n = track.__dict__.get("looks", 0)
    keep = min(EMA, n / (n + 1))  # a running mean while young, then BoT-SORT's smoothing
    mixed = look if own is None else keep * own + (1 - keep) * look
    track.look = mixed / max(float(np.linalg.norm(mixed)), 1e-6)
    track.looks = n + (0 if crowded else 1)  # a mixed look replaces a guess, and is one still


def _batched_update(kf: Any, pairs: list[tuple[Any, Any]], frame_id: int) -> None:
    """`STrack.update` for many tracks at once (KalmanFilterXYAH.update without confidence)."""
    mean = np.stack([t.mean for t, _ in pairs])  # (N, 8)
    cov = np.stack([t.covariance for t, _ in pairs])  # (N, 8, 8)
    meas = np.stack([d.tlwh for _, d in pairs]).astype(np.float64)
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


_classes: dict[str, type] = {}  # kind -> its tracker class, made once per process


def _tracker_class(kind: str) -> type:
    cls = _classes.get(kind)
    if cls is None:
        if kind == "botsort":
            from ultralytics.trackers.bot_sort import BOTSORT

            cls = _timed(BOTSORT)
        else:
            from ultralytics.trackers.byte_tracker import BYTETracker

            cls = _timed(BYTETracker)
        _classes[kind] = cls
    return cls


class StreamTracker:
    """Track ids for one stream's results. `update(det, t)` -> one id per detection (0 = not tracked yet)."""

    @staticmethod
    def prepare(kind: str) -> None:
        """Import a kind's tracker code (ultralytics' trackers, and with them torch: 1.5-3 s cold on a busy
        machine, measured up to 8.5 s inside a loaded process). Called on a worker thread before a stream
        of that kind starts: a first import on the event loop freezes every stream while it runs."""
        _tracker_class(kind)

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
        tracker.class_penalty, tracker.duplicate_iou, tracker.partial_ratio = \
            s.class_penalty, s.duplicate_iou, s.partial_ratio
        tracker.appearance, tracker.appearance_gate, tracker.reid_distance = \
            s.appearance, s.appearance_gate, s.reid_distance
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

    @property
    def wants_image(self) -> bool:
        """Whether `update` reads the frame (for the detections' appearance)."""
        return bool(self.settings.appearance or self.settings.reid_distance)

    def update(self, det: Detections, t: float, image: np.ndarray | None = None) -> np.ndarray:
        """Track ids aligned with `det` (int64; 0 for a detection no confirmed track holds). `image`:
        the frame the boxes are in, for their appearance (`wants_image`)."""
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
        seeing = image is not None and self.wants_image
        looks = appearance(image, det.boxes) if image is not None and seeing and len(det) else None
        if self._interval:
            # a lost track is matched by position for `buffer_s`, by its look alone for `reid_s`
            tracker.buffer_frames = max(1, round(self.settings.buffer_s / self._interval))
            tracker.young_frames = max(2, round(1.0 / self._interval))
            # how far a once-seen object may have moved: a box size per 0.2 s step, nothing at 25 fps
            # (there a step moves it little, and a wider reach only pairs false detections)
            tracker.first_buffer = (float(np.clip((self._interval - 0.04) * FIRST_REACH_PER_S, 0.0, 1.0))
                                    if self.settings.first_reach else 0.0)
            keep = self.settings.reid_s if self.settings.reid_distance and seeing else 0.0
            tracker.max_frames_lost = max(tracker.buffer_frames, round(keep / self._interval))
        boxes = _Boxes(det.boxes.astype(np.float32), det.confidences.astype(np.float32),
                       det.class_ids.astype(np.float32))
        out = tracker.update(boxes, looks)
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
