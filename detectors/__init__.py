"""Model backends behind one small protocol (see `detectors.base`)."""

from .base import (
    Detections,
    Detector,
    DetectorError,
    InferenceError,
    ModelLoadError,
    WeightsNotFoundError,
)
from .offline import prepare_ultralytics_offline
from .yolo import WEIGHTS_HELP, YoloDetector, missing_weights_message

__all__ = [
    "WEIGHTS_HELP",
    "Detections",
    "Detector",
    "DetectorError",
    "InferenceError",
    "ModelLoadError",
    "WeightsNotFoundError",
    "YoloDetector",
    "missing_weights_message",
    "prepare_ultralytics_offline",
]
