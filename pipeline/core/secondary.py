"""Secondary models: a classifier on each tracked object's crop, its top label added to the detection.

A stream's `secondary = [{model = "colour", labels = ["car"]}]` names classify models. On the loop,
`StreamSecondary.attributes` (called by `Results.emit` after tracking) asks for a crop of each new track
and again at most every `every_s`, on a frame where the object scores at least as well as on any
since it was last asked; it attaches the latest answer per track to the result (`attributes`, in the
MQTT detections and in events). The crops are cut and classified off the loop: each classify model
has a worker thread (its slot) with a bounded queue shared by every stream, batching what waits
(up to `batch_size`), so a busy model drops requests (counted), never frames.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from detectors.base import Detections
from detectors.classify import Classifier
from detectors.modelfile import model_kind
from detectors.runtimes import resolve_backend
from pipeline.config import ModelConfig, SecondaryConfig
from streams import Frame

log = logging.getLogger(__name__)

QUEUE = 256  # crops waiting per classify model, from every stream
FORGET_S = 120.0  # a track's answer unused this long is forgotten


@dataclass(slots=True)
class Ask:
    stream: str
    track: int
    frame: Frame
    box: tuple[float, float, float, float]


class ClassifyWorker:
    """One classify model's slot: a thread, its model copy, and the answers per (stream, track)."""

    def __init__(self, name: str, cfg: ModelConfig) -> None:
        self.name = name
        self.cfg = cfg
        self._queue: queue.Queue[Ask | None] = queue.Queue(QUEUE)
        self._answers: dict[tuple[str, int], tuple[str, float, float]] = {}  # -> (label, score, last used)
        self._lock = threading.Lock()
        self.classified = self.dropped = self.batches = self.errors = 0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"classify[{name}]", daemon=True)
        self._thread.start()

    def ask(self, item: Ask) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def answer(self, stream: str, track: int) -> tuple[str, float] | None:
        with self._lock:
            got = self._answers.get((stream, track))
            if got is None:
                return None
            self._answers[(stream, track)] = (got[0], got[1], time.monotonic())
            return got[0], got[1]

    def forget(self, stream: str) -> None:
        with self._lock:
            for key in [k for k in self._answers if k[0] == stream]:
                del self._answers[key]

    def close(self) -> None:
        try:  # waits for room: the worker is draining
            self._queue.put(None, timeout=10)
        except queue.Full:
            log.warning("model %s: its worker did not drain its queue in 10 s", self.name)
        self._thread.join(10)

    def figures(self) -> dict[str, Any]:
        return {"classified": self.classified, "batches": self.batches, "dropped": self.dropped,
                "errors": self.errors, "queued": self._queue.qsize(), "error": self.error}

    def _load(self) -> Classifier | None:
        cfg = self.cfg
        try:
            runtime = resolve_backend(cfg.backend, "cpu", model_kind(cfg.weights))
            if runtime not in ("openvino", "onnxruntime"):
                raise ValueError(f"a classify model runs on openvino or onnxruntime, not {runtime} "
                                 "(pip install 'framegrid[cpu]')")
            model = Classifier(self.name, cfg.weights, runtime, cfg.imgsz, cfg.threads, cfg.label_names())
            model.load()
        except Exception as exc:
            self.error = str(exc)
            log.error("model %s: %s; its streams get no attributes", self.name, exc)
            return None
        return model

    def _run(self) -> None:
        model = self._load()
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.cfg.batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            if model is None:
                self.dropped += len(batch)
                continue
            try:
                answers = model.classify([crop(a.frame.image, a.box) for a in batch])
            except Exception as exc:
                self.errors += 1
                log.warning("model %s: classifying %d crop(s) failed: %s", self.name, len(batch), exc)
                continue
            now = time.monotonic()
            with self._lock:
                for a, (label, score) in zip(batch, answers, strict=True):
                    self._answers[(a.stream, a.track)] = (label, score, now)
                for key in [k for k, v in self._answers.items() if now - v[2] > FORGET_S]:
                    del self._answers[key]
            self.classified += len(batch)
            self.batches += 1


def crop(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    h, w = image.shape[:2]
    x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
    x2, y2 = min(w, max(x1 + 1, round(box[2]))), min(h, max(y1 + 1, round(box[3])))
    return image[y1:y2, x1:x2]


class StreamSecondary:
    """One stream's use of its secondary models (on the loop)."""

    def __init__(self, stream: str, uses: list[SecondaryConfig], workers: dict[str, ClassifyWorker]) -> None:
        self.stream = stream
        self.uses = [(u, workers[u.model]) for u in uses]
        self._asked: dict[tuple[str, int], tuple[float, float]] = {}  # (model, track) -> (asked at, best since)

    def attributes(self, det: Detections, frame: Frame, ids: np.ndarray | None) -> list[dict[str, Any] | None] | None:
        """Attributes per detection (None where there are none yet; None: none at all); crops asked for as due."""
        if ids is None:
            return None
        t = frame.captured_mono or time.monotonic()
        attributes: list[dict[str, Any] | None] = [None] * len(ids)
        frame_area = float(frame.width * frame.height)
        for i, tid in enumerate(int(x) for x in ids):
            if tid == 0:
                continue
            label, score = det.labels[i], float(det.confidences[i])
            for use, worker in self.uses:
                if use.labels is not None and label not in use.labels:
                    continue
                got = worker.answer(self.stream, tid)
                if got is not None and got[1] >= use.min_score:
                    attributes[i] = {**(attributes[i] or {}), use.model: {"label": got[0], "score": round(got[1], 4)}}
                box = (float(det.boxes[i][0]), float(det.boxes[i][1]), float(det.boxes[i][2]), float(det.boxes[i][3]))
                if score < use.confidence or (box[2] - box[0]) * (box[3] - box[1]) < use.min_area * frame_area:
                    continue  # this use's filters: not a crop worth classifying (what it knew stays)
                key = (use.model, tid)
                asked = self._asked.get(key)
                if asked is None or (t - asked[0] >= use.every_s and score >= asked[1]):
                    worker.ask(Ask(self.stream, tid, frame, box))
                    self._asked[key] = (t, score)
                else:
                    self._asked[key] = (asked[0], max(asked[1], score))
        if len(self._asked) > 4096:  # tracks long gone
            self._asked = {k: v for k, v in self._asked.items() if t - v[0] < FORGET_S}
        return attributes if any(a is not None for a in attributes) else None


class Secondaries:
    """The classify models of one pipeline, each started when a stream first uses it."""

    def __init__(self, models: dict[str, ModelConfig]) -> None:
        self.models = models
        self.workers: dict[str, ClassifyWorker] = {}

    def for_stream(self, stream: str, uses: list[SecondaryConfig]) -> StreamSecondary | None:
        if not uses:
            return None
        for use in uses:
            if use.model not in self.workers:
                self.workers[use.model] = ClassifyWorker(use.model, self.models[use.model])
        return StreamSecondary(stream, uses, self.workers)

    def forget(self, stream: str) -> None:
        for worker in self.workers.values():
            worker.forget(stream)

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()

    def figures(self) -> dict[str, dict[str, Any]]:
        return {name: w.figures() for name, w in sorted(self.workers.items())}
