"""framegrid's configuration: one TOML file, validated once, strictly, at the edge.

`load_config(path)` reads TOML with tomllib, substitutes `${ENV}` placeholders (so secrets stay
out of the file), and validates into frozen pydantic models that reject unknown keys. Every
problem is reported with its key path (`streams.cam1.max_fps: ...`), all at once. Relative
paths (weights, file sources) are resolved against the config file's folder. Nothing here
prints a secret: `ConfigError` messages redact URLs.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from detectors import defaults as yolo_defaults
from streams import SourceSettings, is_local_file, redact_text, url_password
from talkinghead import defaults as musetalk_defaults
from talkinghead import tts

from .errors import FramegridError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


def check_name(kind: str, name: str) -> None:
    """A stream's, model's or session's name as the config allows it (ValueError otherwise)."""
    if not re.match(NAME_PATTERN, name):
        raise ValueError(f"{kind} name {name!r} must match {NAME_PATTERN}")
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


def default(model: type[BaseModel], key: str) -> Any:
    """A config key's default, for a library signature that offers one: the value's one home stays here."""
    return model.model_fields[key].default


class ConfigError(FramegridError):
    """Invalid configuration; `errors` lists (key path, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]], source: str = "config") -> None:
        self.errors = errors
        self.source = source
        lines = [f"{path}: {msg}" if path else msg for path, msg in errors]
        super().__init__(f"{source}: {len(errors)} error(s)\n  " + "\n  ".join(lines))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class MqttConfig(Strict):
    url: str = Field("embedded", description="mqtt://host:port, mqtts://host:port (TLS), or 'embedded'; "
                     "mqtt://user:password@host also works (prefer username and password=${ENV_VAR})")
    topic_prefix: str = Field("framegrid", pattern=r"^[^#+\s]+$", description="prefix of every topic")
    username: str | None = Field(None, description="broker user name (or in the URL)")
    password: SecretStr | None = Field(None, description="broker password; use ${ENV_VAR}")
    ca_file: Path | None = Field(None, description="mqtts: CA certificate(s) (PEM) that signed the broker's "
                                 "certificate (default: the system's CAs)")
    cert_file: Path | None = Field(None, description="mqtts: client certificate (PEM), for brokers that "
                                   "require one")
    key_file: Path | None = Field(None, description="mqtts: the client certificate's private key (PEM)")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT version to speak to an external broker (the "
                                            "embedded one speaks 3.1.1); with 5 a publish the broker's ACL refuses is "
                                            "reported (state unauthorized), with 3.1.1 brokers drop it silently")
    client_id: str | None = Field(None, max_length=128, description="defaults to framegrid-<host>-<pid>")
    qos: int = Field(1, ge=0, le=2, description="QoS of detections")
    state_qos: int = Field(1, ge=0, le=2, description="QoS of retained state/availability")
    stats_qos: int = Field(0, ge=0, le=2, description="QoS of periodic stats")
    keepalive: int = Field(30, ge=5, le=3600, description="seconds")
    buffer: int = Field(1000, ge=1, le=1_000_000, description="messages kept while disconnected")
    stats_interval: float = Field(5.0, gt=0, le=3600, description="seconds between stats messages")
    embedded_port: int = Field(1883, ge=0, le=65535, description="port of the embedded broker (0 = any)")
    reconnect_cap: float = Field(30.0, gt=0, le=3600, description="max seconds between reconnects")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v == "embedded":
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError("must be 'embedded' or mqtt://host[:port] (mqtts:// for TLS)")
        if not parts.hostname:
            raise ValueError("has no host")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        return v

    @model_validator(mode="after")
    def _credentials(self) -> MqttConfig:
        if self.url == "embedded":
            return self
        parts = urlsplit(self.url)
        if parts.username is not None and self.username is not None and unquote(parts.username) != self.username:
            raise ValueError("the user name is given twice (in mqtt.url and mqtt.username) and differs: keep one")
        if parts.password is not None and self.password is not None:
            raise ValueError("the password is given twice (in mqtt.url and mqtt.password): keep mqtt.password "
                             "= \"${MQTT_PASSWORD}\"")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mqtt.cert_file and mqtt.key_file go together")
        if not self.tls and (self.ca_file or self.cert_file):
            raise ValueError("ca_file/cert_file/key_file need TLS: write the url as mqtts://host:port")
        return self

    @property
    def user(self) -> str | None:
        """The user name: `username`, else the URL's."""
        if self.username is not None or self.url == "embedded":
            return self.username
        name = urlsplit(self.url).username
        return unquote(name) if name is not None else None

    def secret(self) -> str | None:
        """The password: `password`, else the URL's."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.url == "embedded":
            return None
        word = urlsplit(self.url).password
        return unquote(word) if word is not None else None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme in ("mqtts", "ssl") else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme in ("mqtts", "ssl")


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """How a pool batches, watches and restarts its slots: resolved from the models below (their defaults)."""

    batch_size: int
    batch_timeout: float  # seconds a partial batch may wait, and only when waiting pays
    hang_timeout: float  # floor of the watchdog; it grows with the measured batch time
    restart_budget: int  # restarts allowed within restart_window; one more fault: failed
    restart_window: float
    restart_backoff_cap: float
    admission_control: bool  # refuse members that fit nowhere instead of overfilling a slot
    rebalance_band: float
    cpu_batch_ms: float | None = None  # CPU slots: cut batches to what runs in this long (None: no cut)
    restart_stable_s: float = 10.0  # SlotPoolConfig.restart_stable_s



class SlotPoolConfig(Strict):
    """The restart rule every executor-slot pool follows (detection models and lipsync alike)."""

    restart_budget: int = Field(3, ge=0, le=100, description="slot restarts allowed per restart_window")
    restart_window: float = Field(300.0, gt=0, le=86400, description="seconds")
    restart_backoff_cap: float = Field(30.0, gt=0, le=3600, description="most seconds between restart attempts "
                                       "(full-jitter backoff)")
    restart_stable_s: float = Field(10.0, gt=0, le=3600, description="a slot up this long since its last "
                                    "(re)start that faults is a new incident: its restart waits the shortest "
                                    "backoff again (a slot that faults sooner escalates; the budget counts both)")

    def _pool_settings(self, batch_size: int, batch_timeout_ms: float, hang_timeout: float,
                       pipeline: PipelineConfig, cpu_batch_ms: float | None = None) -> PoolSettings:
        return PoolSettings(batch_size, batch_timeout_ms / 1000, hang_timeout, self.restart_budget,
                            self.restart_window, self.restart_backoff_cap, pipeline.admission_control,
                            pipeline.rebalance_band, cpu_batch_ms, self.restart_stable_s)


class TrackerConfig(Strict):
    """Multi-object tracking of a model's (or a stream's) detections: ultralytics' trackers, timed."""

    type: Literal["bytetrack", "botsort", "none"] = Field("bytetrack", description="tracker (none = no track ids)")
    high_thresh: float = Field(0.25, ge=0, le=1, description="first-stage match threshold (ultralytics' default)")
    low_thresh: float = Field(0.1, ge=0, le=1, description="second-stage threshold for low-score detections")
    new_track_thresh: float = Field(0.25, ge=0, le=1, description="a detection this confident may start a track")
    match_thresh: float = Field(0.95, gt=0, le=1, description="association cost threshold (1 - IoU, score-fused, plus "
                                "the class and appearance terms: hence above ultralytics' 0.8, which has neither)")
    buffer_s: float = Field(1.2, gt=0, le=600, description="seconds a lost track is kept for re-identification "
                            "(ultralytics' 30 frames at 25 fps, as time)")
    min_hits: int = Field(2, ge=1, le=1000, description="frames an object is seen before its track id is "
                          "published (2: as ultralytics' trackers activate a track)")
    class_penalty: float = Field(0.1, ge=0, le=2, description="added to the association cost where a detection's "
                                 "class is not the track's (its score-weighted majority): crossing objects of "
                                 "different classes keep their ids, a class flip with agreeing boxes still "
                                 "matches; 0 = class-agnostic like ultralytics")
    duplicate_iou: float = Field(0.5, gt=0, le=1, description="an unmatched detection overlapping a matched one "
                                 "at least this much (IoU) starts no track: the detector's second box or class for "
                                 "one object; 1 = off")
    fuse_score: bool = Field(True, description="fuse detection scores into the association cost "
                             "(ultralytics' default)")
    partial_ratio: float = Field(0.8, ge=0, lt=1, description="a detected box this much narrower (or lower) than "
                                 "its track's usual size is a cut view (an object sliding behind something or off "
                                 "the frame): the track keeps its size and speed instead of learning the cut box; "
                                 "0 = off")
    first_reach: bool = Field(True, description="a track seen once (no velocity yet) matches a detection up to "
                              "about a box size away at 5 fps (buffered IoU; less at higher rates): a fast object "
                              "at a low detect rate gets a track")
    appearance: float = Field(0.5, ge=0, le=2, description="weight of the appearance distance (colour histograms "
                              "of the boxes, 0-1) in the association cost: look-alike boxes match first where "
                              "objects cross; 0 = off")
    appearance_gate: float = Field(0.5, gt=0, le=1, description="a track and a detection whose appearance "
                                   "distance is above this never match (1 = no gate)")
    reid_distance: float = Field(0.15, ge=0, le=1, description="a lost track is found again anywhere in the frame "
                                 "by a detection of its class and size this close in appearance (an exit and "
                                 "re-entry, a long occlusion); 0 = off")
    reid_s: float = Field(10.0, gt=0, le=600, description="seconds a lost track can be found again by its "
                          "appearance (`reid_distance`)")



Coordinates = list[Annotated[list[float], Field(min_length=2, max_length=2)]]


class ZoneConfig(Strict):
    polygon: Coordinates = Field(min_length=3, description="corners [[x, y], ...] in source pixels, or fractions "
                                 "of the frame when every value is at most 1")
    anchor: Literal["bottom_center", "center", "top_center", "bottom_left", "bottom_right"] = Field(
        "bottom_center", description="the point of a box that must be inside (bottom-centre: where it stands)")
    objects: list[str] | None = Field(None, description="only these labels (default: all)")
    min_confidence: float = Field(0.0, ge=0, le=1, description="only detections at least this confident")
    min_frames: int = Field(1, ge=1, le=1000, description="consecutive frames inside (or outside) before an "
                            "object counts as entered (or left)")


class MaskConfig(Strict):
    polygon: Coordinates = Field(min_length=3, description="corners [[x, y], ...] in source pixels, or fractions "
                                 "of the frame when every value is at most 1")
    anchor: Literal["bottom_center", "center", "top_center", "bottom_left", "bottom_right"] = Field(
        "bottom_center", description="a detection whose anchor falls inside is dropped")


class LineConfig(Strict):
    points: Coordinates = Field(min_length=2, max_length=2, description="the segment [[x1, y1], [x2, y2]] (pixels "
                                "or fractions); crossing from its left to its right (seen from the first point "
                                "towards the second, y down) counts as `in`")
    anchor: Literal["bottom_center", "center", "top_center", "bottom_left", "bottom_right"] = "bottom_center"
    objects: list[str] | None = Field(None, description="only these labels (default: all)")
    min_confidence: float = Field(0.0, ge=0, le=1)


def stream_references(name: str, stream: StreamConfig, models: dict[str, ModelConfig]) -> list[str]:
    """What a stream's model and secondary models name that does not exist or is of the wrong type."""
    known = ", ".join(sorted(models)) or "none defined"
    errors = []
    model = models.get(stream.model)
    if model is None:
        errors.append(f"streams.{name}.model: unknown model '{stream.model}' (models: {known})")
    elif model.type != "yolo":
        errors.append(f"streams.{name}.model: '{stream.model}' is a {model.type} model; a stream's model detects "
                      "(a classifier goes in `secondary`)")
    for i, sec in enumerate(stream.secondary):
        other = models.get(sec.model)
        if other is None:
            errors.append(f"streams.{name}.secondary[{i}].model: unknown model '{sec.model}' (models: {known})")
        elif other.type != "classify":
            errors.append(f"streams.{name}.secondary[{i}].model: '{sec.model}' is a {other.type} model; "
                          "secondary models classify (type = \"classify\")")
    return errors


class ModelConfig(SlotPoolConfig):
    type: Literal["yolo", "classify"] = Field(description="yolo: detection (a stream's model); classify: a "
                                              "classification model run on detected objects' crops "
                                              "(a stream's `secondary`)")
    backend: Literal["auto", "torch", "onnxruntime", "openvino", "tensorrt"] = Field(
        "auto", description="auto: torch on CUDA, else the fastest installed CPU runtime (openvino, onnxruntime, "
        "torch) that runs the weights' kind; a .pt's exported graphs are made once and cached next to it")
    weights: Path = Field(description="a YOLOv8/YOLO11 detection model: .pt, .onnx (dynamic or fixed shapes), an "
                          "OpenVINO IR folder or its .xml, a TensorRT .engine (CUDA only), or a .yaml for an "
                          "untrained model; relative to the config")
    names: list[str] | None = Field(None, min_length=1, description="class names in class-id order (default: "
                                    "the file's own metadata)")
    classes_file: Path | None = Field(None, description="a text file of class names, one per line in class-id "
                                      "order (instead of `names`)")
    imgsz: int = Field(yolo_defaults.IMGSZ, ge=32, le=4096, multiple_of=32, description="inference size")
    confidence: float = Field(yolo_defaults.CONFIDENCE, ge=0.0, le=1.0, description="minimum confidence "
                              "(ultralytics' default)")
    iou: float = Field(yolo_defaults.IOU, gt=0.0, le=1.0, description="NMS IoU threshold (ultralytics' default)")
    max_det: int = Field(300, ge=1, le=10_000, description="most boxes per frame (ultralytics' default)")
    agnostic_nms: bool = Field(False, description="NMS across classes (a box suppresses overlapping boxes of "
                               "any class)")
    batch_size: int = Field(4, ge=1, le=256, description="max frames per batch")
    cpu_batch_ms: float | None = Field(30.0, ge=0, le=10_000, description="a CPU slot cuts its batches to what "
                                "it runs in this many ms (from its measured time per frame): cheap frames "
                                "batch, costly ones go one at a time (a CPU gains little from batching them "
                                "and latency grows with every frame); 0 = always up to batch_size")
    slots: int | None = Field(None, ge=1, le=64, description="executor slots (model copies, one worker thread "
                              "each); default: planned from the devices (see `framegrid devices`)")
    slot_memory_gb: float | None = Field(None, gt=0, le=1024, description="GPU memory one slot of this model "
                                         "needs (default: devices.slot_memory_gb)")
    hang_timeout: float = Field(10.0, gt=0, le=3600, description="seconds a batch may run before the slot is "
                                "declared hung (at least 10x its measured time)")
    device: str = Field("auto", pattern=r"^(cpu|auto|cuda(:\d+)?)$",
                        description="auto (every planned device), cpu, or cuda[:N]")
    half: bool = Field(False, description="FP16 (CUDA only)")
    cpu_precision: Literal["auto", "f32", "bf16", "int8"] = Field(
        "auto", description="OpenVINO inference precision on the CPU: auto = the CPU's fastest float (bf16 where it "
        "has BF16 units), f32 = full precision, int8 = the .pt's export quantized (NNCF) on the `calibration` "
        "images (fastest on CPUs with VNNI; check its answers against auto's with tools/agreement.py)")
    calibration: Path | None = Field(None, description="a folder of 16+ (a few hundred are best) .jpg/.png frames "
                                     "from the cameras this model watches: what cpu_precision = int8 is calibrated "
                                     "on; relative to the config")
    classes: list[str] | None = Field(None, description="publish only these labels")
    tracker: TrackerConfig = Field(default_factory=TrackerConfig, description="tracking of this model's "
                                   "detections (a stream's own [streams.<name>.tracker] wins)")
    threads: int | None = Field(None, ge=1, le=256, description="inference threads per CPU slot "
                                "(default: cores / CPU slots)")

    @model_validator(mode="after")
    def _model_file(self) -> ModelConfig:
        from detectors.modelfile import ModelFileError, model_kind, runtime_refusal

        if self.names is not None and self.classes_file is not None:
            raise ValueError("set names or classes_file, not both")
        try:
            refusal = runtime_refusal(self.backend, model_kind(self.weights))
        except ModelFileError:
            return self  # the file check names the weights' kind (models.<name>.weights)
        if refusal is not None:
            raise ValueError(refusal)
        if self.cpu_precision == "int8":
            if self.calibration is None:
                raise ValueError("cpu_precision = \"int8\" needs `calibration`: a folder of frames from the "
                                 "cameras the model watches")
            if self.backend not in ("auto", "openvino") or model_kind(self.weights) != "pt":
                raise ValueError("cpu_precision = \"int8\" quantizes a .pt's OpenVINO export: give the .pt and "
                                 "backend auto or openvino")
        return self

    def label_names(self) -> tuple[str, ...]:
        """The class names the config gives (`names`, or `classes_file` read now); empty: the file's own."""
        from detectors.modelfile import read_names_file

        if self.classes_file is not None:
            return read_names_file(self.classes_file)
        return tuple(self.names or ())

    def pool_settings(self, pipeline: PipelineConfig) -> PoolSettings:
        return self._pool_settings(self.batch_size, pipeline.batch_timeout_ms, self.hang_timeout, pipeline,
                                   self.cpu_batch_ms or None)


class SecondaryConfig(Strict):
    """A classification model run on a stream's tracked objects' crops; its top label goes in `attributes`."""

    model: str = Field(description="a model of type classify")
    labels: list[str] | None = Field(None, description="only objects with these labels (default: all)")
    every_s: float = Field(2.0, gt=0, le=3600, description="an object is classified again at most this often, "
                           "on its best crop since")
    min_score: float = Field(0.0, ge=0, le=1, description="a class probability below this is not kept")
    confidence: float = Field(0.0, ge=0, le=1, description="only crops of detections scoring at least this are "
                              "classified (this use's own filter: the stream's filters come first)")
    min_area: float = Field(0.0, ge=0, le=1, description="only crops of at least this fraction of the frame are "
                            "classified (a crop too small to tell its class)")


class StreamRecordConfig(Strict):
    """A stream's event clips: the camera's own packets around each event, copied (never re-encoded)."""

    enabled: bool = Field(False, description="write one MP4 per event (needs tracking and events)")
    pre_s: float = Field(5.0, ge=0, le=60, description="seconds before the event's start (from the keyframe at or "
                         "before it)")
    post_s: float = Field(5.0, ge=0, le=300, description="seconds after the event's end")
    max_clip_s: float = Field(600.0, gt=0, le=86_400, description="a clip is cut after this long (an object that "
                              "never leaves)")
    continuous: bool = Field(False, description="also record all the time, in segments (same copy, same disk "
                             "budget; retain_days' `continuous` entry, else its default)")
    segment_s: float = Field(60.0, ge=5, le=3600, description="length of a continuous segment (each starts on a "
                             "keyframe)")

    @model_validator(mode="after")
    def _continuous_records(self) -> StreamRecordConfig:
        if self.continuous and not self.enabled:
            raise ValueError("continuous = true records nothing while enabled = false: set enabled = true "
                             "(the recorder writes both event clips and segments)")
        return self


class StreamConfig(SourceSettings):
    """A stream: the source's own settings (`streams.SourceSettings`: transport, timeouts, reconnect,
    pacing) plus what the pipeline needs."""

    url: str = Field(min_length=1, description="any FFmpeg URL or a file path (relative to the config); with "
                     "detect_url, the camera's main stream: recorded by packet copy, never decoded")
    detect_url: str | None = Field(None, min_length=1, description="the camera's substream, decoded for detection "
                                   "(an NVR camera's 640x360 beside its 1080p main stream); detections are "
                                   "published in the main stream's pixels")
    model: str = Field(description="name of a [models.<name>] table")
    max_fps: float | None = Field(None, gt=0, le=1000, description="process at most this many frames/s")
    enabled: bool = Field(True, description="false keeps it configured but not running")
    tracker: TrackerConfig | None = Field(None, description="this stream's tracking (default: its model's)")
    zones: dict[Name, ZoneConfig] = Field(default_factory=dict, description="named zones (events, counts)")
    lines: dict[Name, LineConfig] = Field(default_factory=dict, description="named counting lines")
    # filters of this stream's detections, on its model's shared copy; changed at run time without a reconnect
    classes: list[str] | None = Field(None, description="keep only these labels (default: every label the model "
                                      "publishes)")
    confidence: float | None = Field(None, ge=0, le=1, description="drop detections below this score (above the "
                                     "model's own threshold)")
    label_confidence: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="per label, instead of `confidence`: {person = 0.6, car = 0.4}")
    min_area: float | None = Field(None, ge=0, le=1, description="drop boxes smaller than this fraction of the frame")
    max_area: float | None = Field(None, gt=0, le=1, description="drop boxes larger than this fraction of the frame")
    secondary: list[SecondaryConfig] = Field(default_factory=list, description="classifiers on its objects' crops: "
                                             "[{model = \"colour\", labels = [\"car\"]}] (needs tracking)")
    record: StreamRecordConfig = Field(default_factory=StreamRecordConfig, description="event clips (set once for "
                                       "all cameras in [stream_defaults.record])")
    masks: dict[Name, MaskConfig] = Field(default_factory=dict, description="named polygons: detections whose "
                                          "anchor falls inside one are dropped (a tree, a timestamp overlay)")

    @model_validator(mode="after")
    def _areas(self) -> StreamConfig:
        if self.min_area is not None and self.max_area is not None and self.min_area >= self.max_area:
            raise ValueError(f"max_area must be larger than min_area ({self.min_area})")
        return self

    @model_validator(mode="after")
    def _roles(self) -> StreamConfig:
        if self.detect_url is None:
            return self
        if self.detect_url == self.url:
            raise ValueError("detect_url is the url: leave it out when one stream does both")
        pixels = [f"{kind}.{name}" for kind, table in (("zones", self.zones), ("masks", self.masks))
                  for name, z in table.items() if any(v > 1 for pt in z.polygon for v in pt)]
        pixels += [f"lines.{name}" for name, ln in self.lines.items() if any(v > 1 for pt in ln.points for v in pt)]
        if pixels:
            raise ValueError(f"{', '.join(pixels)}: with detect_url, give the corners as fractions of the frame "
                             "(0..1): the main stream and the substream differ in size")
        return self

    @field_validator("url", "detect_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if any(c.isspace() for c in v.strip()) and "://" in v:
            raise ValueError("URL contains white space")
        return v.strip()


class PipelineConfig(Strict):
    max_frame_age: float = Field(1.0, gt=0, le=60, description="older frames are dropped (too_old)")
    batch_timeout_ms: float = Field(15.0, ge=0, le=10_000, description="most a partial batch waits for frames "
                                    "due soon (it waits only when one is)")
    status_interval: float = Field(5.0, ge=0, le=3600, description="seconds between console status; 0 = off")
    decode_threads: int = Field(0, ge=0, le=64, description="FFmpeg threads per decoder (0 = cores / streams, "
                                "at least 1)")
    rebalance_interval: float = Field(30.0, ge=0, le=86400, description="seconds between rebalancing; 0 = off")
    rebalance_band: float = Field(0.10, gt=0, le=10, description="rebalance until max/mean load <= 1 + band")
    admission_control: bool = Field(False, description="refuse streams that fit on no slot (state 'refused')")
    malloc_mmap_threshold_kb: int = Field(0, ge=0, le=65536, description="fixed glibc mmap threshold, so "
                                          "frame and tensor buffers go back to the system when freed (0 = glibc's "
                                          "dynamic threshold)")
    malloc_trim_threshold_kb: int = Field(131072, ge=0, le=1048576, description="free heap memory glibc keeps "
                                          "for reuse instead of returning it to the system; with it, blocks up to "
                                          "32 MB come from the heap, so converted frames reuse memory instead of "
                                          "fresh pages (0 = glibc's dynamic thresholds)")
    malloc_arenas: int = Field(2, ge=0, le=1024, description="most glibc malloc arenas, set at start (0 = glibc's "
                               "default of 8 per core); fewer arenas fragment less as decoder threads come and go")
    shed_decode: bool = Field(True, description="while decode-bound, live streams with skip_frames = auto decode "
                              "keyframes only (tried again after a hold that doubles on each relapse)")
    shed_hold: float = Field(60.0, ge=5, le=3600, description="seconds of keyframes-only decoding before full "
                             "decoding is tried again (doubled on each relapse within twice the hold, at most "
                             "15 min or this)")


class DevicesConfig(Strict):
    usable_fraction: float = Field(0.9, gt=0, le=1, description="share of a GPU's free memory slots may use")
    slot_memory_gb: float = Field(2.0, gt=0, le=1024, description="memory one detect slot needs on a GPU")
    cpu_slots: int | None = Field(None, ge=0, le=256, description="detect slots on the CPU; default: one per core, "
                                  "at most 4 (single-threaded slots side by side measured 24 ms CPU per frame "
                                  "vs 34 ms for one slot on both cores)")
    cpu_threads_per_slot: int | None = Field(None, ge=1, le=256, description="default: cores / cpu_slots")
    use_cpu_with_gpus: bool = Field(False, description="also run CPU slots when GPUs are present")
    overrides: dict[Annotated[str, Field(pattern=r"^(cpu|cuda:\d+)$")], Annotated[int, Field(ge=0, le=256)]] = Field(
        default_factory=dict, description="slots per device id, e.g. {\"cuda:0\" = 3}")


class TalkConfig(Strict):
    avatar: Path = Field(description="photo or short video with a frontal face (relative to the config)")
    box: tuple[int, int, int, int] | None = Field(None, description="face box x1, y1, x2, y2 instead of detection")
    audio: str = Field(min_length=1, description="'mqtt' (PCM chunks on <prefix>/talk/<name>/audio), 'webrtc' "
                       "(a browser's microphone through the HTTP API), a file, or any FFmpeg URL")
    out: str = Field(min_length=1, description="sink: 'webrtc' (browsers, through the HTTP API), a file, a .m3u8 "
                     "HLS playlist, rtsp:// or rtmp:// URL")
    backend: Literal["energy", "musetalk"] = Field(
        "energy", description="energy (loudness-driven mouth, no weights) or musetalk (needs [lipsync] weights)")
    enabled: bool = True


VoiceName = Annotated[str, Field(min_length=1, max_length=64, pattern=tts.VOICE_PATTERN)]


class TtsConfig(Strict):
    """`[tts]`: how `say` and talk jobs from text speak (offline: Debian's espeak-ng, or piper voices)."""

    voice: VoiceName = Field("en", description="espeak-ng voice (`espeak-ng --voices` lists them: en, en-us, "
                             "de, fr, ...) or the name of a voice in `piper`; a `say` may name another")
    speed: int = Field(tts.DEFAULT_SPEED, ge=80, le=500, description="words per minute (a piper voice: "
                       f"its own pace at {tts.DEFAULT_SPEED})")
    piper: dict[VoiceName, Path] = Field(default_factory=dict, description="piper voices by name: the voice's "
                                         ".onnx file, its .onnx.json beside it (from the piper-voices collection), "
                                         "relative to the config")

    def speech(self) -> tts.Speech:
        return tts.Speech(self.voice, self.speed, self.piper)


class LipSyncConfig(SlotPoolConfig):
    weights: Path | None = Field(None, description="MuseTalk models folder in the official layout (musetalkV15/, "
                                 "sd-vae/, whisper/), relative to the config")
    version: Literal["v15", "v1"] = Field(musetalk_defaults.VERSION, description="MuseTalk version")
    slots: int | None = Field(None, ge=1, le=64, description="lipsync slots (model copies); default: planned "
                              "from GPU memory / slot_memory_gb, 1 on a CPU")
    slot_memory_gb: float = Field(8.0, gt=0, le=1024, description="GPU memory one MuseTalk slot needs (upstream "
                                  "reports 4-12 GB in fp16)")
    batch_size: int = Field(musetalk_defaults.BATCH_SIZE, ge=1, le=256, description="most frames per UNet batch, "
                            "across the slot's sessions")
    batch_timeout_ms: float = Field(20.0, ge=0, le=10_000, description="how long a batch waits for other "
                                    "sessions' frames")
    block: int = Field(4, ge=1, le=64, description="frames a session renders per request (latency vs batching)")
    timeout: float = Field(2.0, gt=0, le=600, description="seconds a live session waits for a block's frames "
                           "before showing its last frame instead")
    device: str = Field("auto", pattern=r"^(cpu|auto|cuda(:\d+)?)$", description="auto, cpu, or cuda[:N]")
    hang_timeout: float = Field(30.0, gt=0, le=3600, description="seconds a batch may run before the slot is "
                                "declared hung (at least 10x its measured time)")
    max_queue: int = Field(64, ge=1, le=10_000, description="requests waiting per session; beyond it a request "
                           "fails at once (the session shows its last frame)")
    parsing_mode: Literal["jaw", "raw", "neck"] | None = Field(
        None, description="blend mask from face parsing: jaw (v1.5's default: chin covered, cheeks eroded, nose "
        "kept), raw (v1.0's: skin and lips), neck (raw and the neck); default: the version's")
    cheek_width: int = Field(musetalk_defaults.CHEEK_WIDTH, ge=0, le=256, description="jaw mode: half-width (px "
                             "of the 512 parse) of the central band left uneroded")
    render_silence: Literal["around_speech", "always"] = Field(
        "around_speech", description="live sessions: around_speech, the model renders frames within a few frames "
        "of speech (cross-faded both ways to the avatar's own frames; saves the model's time in pauses); always: "
        "every frame")
    offline_render_silence: Literal["around_speech", "always"] = Field(
        "always", description="talk jobs and `framegrid talk`: always (every frame, as MuseTalk's published "
        "inference renders) or around_speech (faster on pauses)")
    whisper: Literal["auto", "slot", "session"] = Field(
        "auto", description="where live sessions' Whisper encoder runs: on the lipsync slots (beside the UNet, "
        "in their memory plan) or on the session side (one shared copy); auto: slots when all are GPUs")
    lookahead_ms: int = Field(200, ge=80, le=2000, description="live: audio after a block the Whisper features "
                              "see (latency: at least the model's 80 ms window)")

    def pool_settings(self, pipeline: PipelineConfig) -> PoolSettings:
        return self._pool_settings(self.batch_size, self.batch_timeout_ms, self.hang_timeout, pipeline)


class WebRtcConfig(Strict):
    addresses: list[str] = Field(default_factory=list, description="local addresses offered to browsers (ICE host "
                                 "candidates); default: every interface but loopback. [\"127.0.0.1\"] for one machine")
    max_viewers: int = Field(16, ge=1, le=1000, description="viewers per session")


class ApiConfig(Strict):
    enabled: bool = Field(True, description="serve the HTTP API, /metrics and the web page")
    listen: str = Field("127.0.0.1:8080", description="host:port to bind (port 0 = any free port); a "
                        "non-loopback address needs a token")
    token: SecretStr | None = Field(None, description="bearer token every route but /api/health and /api/ready "
                                    "needs; use ${FRAMEGRID_TOKEN}")
    mjpeg_fps: float = Field(5.0, gt=0, le=30, description="most frames/s of a live view (/mjpeg)")
    max_upload_mb: float = Field(50.0, gt=0, le=4096, description="largest file a talk job may upload")
    max_queued_jobs: int = Field(100, ge=1, le=100_000, description="talk jobs waiting to render at most; a new "
                                 "job beyond it is refused (503, nothing stored)")
    jobs_crf: int = Field(18, ge=0, le=51, description="x264 CRF of talk jobs' videos (18: MuseTalk's published "
                          "inference; lower is better and larger)")
    jobs_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                         "veryslow"] = Field("medium", description="x264 preset of talk jobs' videos (medium: "
                                             "MuseTalk's published inference; faster presets make larger files)")
    jobs_dir: Path | None = Field(None, description="where talk jobs keep their inputs and results (default: "
                                  "<config name>.jobs beside the config)")
    media_dirs: list[Path] | None = Field(None, description="folders whose files API clients may name (stream "
                                          "files, avatars, audio, session outputs, job inputs); default: the "
                                          "config's folder; relative to the config")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError("must be host:port, e.g. 127.0.0.1:8080 or 0.0.0.0:8080")
        return v

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def loopback(self) -> bool:
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: may resolve to anything

    @model_validator(mode="after")
    def _exposed_needs_token(self) -> ApiConfig:
        if self.enabled and not self.loopback and (self.token is None or not self.token.get_secret_value()):
            raise ValueError(f"listen {self.listen} is not a loopback address: set api.token (e.g. token = "
                             "\"${FRAMEGRID_TOKEN}\") or listen on 127.0.0.1")
        return self


class EventsConfig(Strict):
    enabled: bool = Field(True, description="turn tracked objects into events (needs tracking)")
    end_after: float = Field(5.0, gt=0, le=3600, description="seconds an object is unseen before its event ends "
                             "(Frigate's 5 s: an object that steps out of view for a moment keeps its event)")
    min_seen_s: float = Field(0.5, ge=0, le=60, description="seconds a track must last before its event starts "
                              "(a shorter one, a flicker or a duplicate box, starts none); 0: at its first sighting")
    update_interval: float = Field(2.0, ge=0, le=3600, description="fewest seconds between two `update` events of "
                                   "one object for a better score or a stationary change (zone changes and line "
                                   "crossings are never held back)")
    stationary_after: float = Field(3.0, gt=0, le=3600, description="seconds an object stays within "
                                    "stationary_fraction of the frame width before it is stationary")
    stationary_fraction: float = Field(0.02, gt=0, le=1)
    store: Path | None = Field(None, description="SQLite file of events (default: events.db in <config>.events/ "
                               "beside the config, where the snapshots go too); relative to the config")
    max_age_days: float = Field(30.0, gt=0, le=36500, description="events older than this are deleted")
    max_events: int = Field(100_000, ge=1, le=100_000_000, description="most events kept (oldest deleted first)")
    max_queue: int = Field(10_000, ge=10, le=1_000_000, description="event writes waiting for the store's disk; "
                           "beyond it new writes are dropped and counted (framegrid_event_store_dropped_total)")
    snapshots: bool = Field(True, description="keep each event's best frame as JPEGs (crop and full frame)")
    max_snapshots: int = Field(500, ge=0, le=1_000_000, description="snapshots kept per stream (oldest deleted "
                               "first)")
    mqtt_snapshots: bool = Field(False, description="also publish each ended event's crop on "
                                 "<prefix>/streams/<s>/snapshot/<label> (retained)")


class RecordConfig(Strict):
    """`[record]`: where clips go and the one disk budget of clips and event snapshots."""

    dir: Path | None = Field(None, description="folder of clips (default: clips/ beside the event store); "
                             "relative to the config")
    max_gb: float = Field(10.0, gt=0, le=1_000_000, description="clips and event snapshots together: over it, the "
                          "oldest events' media are deleted first (their events stay)")
    retain_days: dict[str, Annotated[float, Field(gt=0, le=36500)]] = Field(
        default_factory=lambda: {"default": 10.0}, description="days an event's clip and snapshots are kept, per "
        "label: {default = 10, person = 30}")


class HomeAssistantConfig(Strict):
    """`[homeassistant]`: MQTT discovery, so Home Assistant lists each stream's entities by itself."""

    enabled: bool = Field(False, description="publish retained discovery configs for every stream")
    discovery_prefix: str = Field("homeassistant", pattern=r"^[A-Za-z0-9_\-/]+$", description="Home Assistant's "
                                  "discovery prefix (its MQTT integration's setting)")
    labels: list[str] | None = Field(None, description="labels that get an object-count sensor and a snapshot "
                                     "camera (default: the stream's classes, else its model's classes, else "
                                     "every class of the model)")


class WebhookConfig(Strict):
    """`[[webhooks]]`: each event (new/update/end) POSTed as JSON to `url`, signed when `secret` is set."""

    url: str = Field(description="http:// or https:// URL events are POSTed to (credentials in it are redacted "
                     "from logs)")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="the hook's name in stats and metrics "
                             "(default: webhook-<n>, n counting from 1)")
    events: list[Literal["new", "update", "end"]] = Field(["new", "end"], min_length=1,
                                                          description="event types sent")
    labels: list[str] | None = Field(None, description="only events of objects with these labels (default: all)")
    streams: list[str] | None = Field(None, description="only events of these streams (default: all)")
    secret: SecretStr | None = Field(None, description="signs each body: X-Framegrid-Signature: sha256=<hex "
                                     "HMAC-SHA256 of the body>; use ${WEBHOOK_SECRET}")
    timeout_s: float = Field(5.0, gt=0, le=300, description="seconds one delivery attempt may take")
    retries: int = Field(5, ge=0, le=100, description="attempts after the first for a failed delivery (timeout, "
                         "connection error, HTTP 5xx, 408 or 429), with exponential backoff; other 4xx are not retried")
    max_queue: int = Field(1000, ge=1, le=1_000_000, description="events waiting for this hook; beyond it new ones "
                           "are dropped and counted (framegrid_webhook_events_total{outcome=\"dropped\"})")

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return v


class LogConfig(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"


class ClusterConfig(Strict):
    """Where framegrid runs: one process (`local`), or one worker per node of a Ray cluster (`ray`)."""

    backend: Literal["local", "ray"] = Field("local", description="local: this process runs everything (no Ray "
                                             "import); ray: this process is the head, placing streams on a node "
                                             "worker per Ray node (pip install framegrid[cluster])")
    address: str = Field("auto", description="the Ray cluster: auto (the one `ray start` made on this machine), "
                         "host:port of its head, or ray://host:port (Ray Client)")
    namespace: str = Field("framegrid", pattern=r"^[A-Za-z0-9_.-]+$", description="Ray namespace of the node "
                           "workers (a restarted head finds them there)")
    node_resource: str = Field("framegrid", pattern=r"^[A-Za-z0-9_.-]+$", description="custom resource a Ray node "
                               "advertises to get a worker (ray start --resources '{\"framegrid\": 1}')")
    ping_s: float = Field(1.0, gt=0, le=60, description="seconds between the head's checks of each worker")
    dead_after_s: float = Field(5.0, gt=0, le=600, description="a worker that has not answered this long is "
                                "taken as lost: its streams move to the other nodes")
    start_grace_s: float = Field(10.0, ge=0, le=3600, description="for this long after a worker came up (its "
                                 "streams starting, models compiling shapes), it is lost only after 3 x "
                                 "dead_after_s without an answer (a late answer is warned about)")
    rebalance_s: float = Field(30.0, gt=0, le=86400, description="seconds between rebalancing passes (also "
                               "after a node joins)")
    band: float = Field(0.10, ge=0, le=10, description="rebalance while a node is this much above (or below) the "
                        "mean load (hysteresis: fewer moves)")
    max_moves: int = Field(8, ge=0, le=10_000, description="most streams moved by one rebalancing pass")
    dwell_s: float = Field(120.0, ge=0, le=86400, description="a stream a rebalancing pass moved is not moved "
                           "again by one for this long (a move costs a reconnect; without it a stream can "
                           "ping-pong as the nodes' measured throughput wobbles)")


class Config(Strict):
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    models: dict[Name, ModelConfig] = Field(default_factory=dict)
    streams: dict[Name, StreamConfig] = Field(default_factory=dict)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    talk: dict[Name, TalkConfig] = Field(default_factory=dict)
    lipsync: LipSyncConfig = Field(default_factory=LipSyncConfig)
    tts: TtsConfig = Field(default_factory=TtsConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    webrtc: WebRtcConfig = Field(default_factory=WebRtcConfig)
    webhooks: list[WebhookConfig] = Field(default_factory=list, description="`[[webhooks]]`: events POSTed "
                                          "to HTTP endpoints")
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
    record: RecordConfig = Field(default_factory=RecordConfig)
    stream_defaults: dict[str, Any] = Field(default_factory=dict, description="`[stream_defaults]`: keys every "
                                            "stream takes unless it sets its own (any [streams.<name>] key but "
                                            "url; tables merge key by key); also for streams added through the API")

    @model_validator(mode="after")
    def _references(self) -> Config:
        errors = []
        hooks = self.webhook_names()
        errors += [f"webhooks[{i}].name: {n!r} names another hook too" for i, n in enumerate(hooks)
                   if hooks.count(n) > 1]
        for name, stream in self.streams.items():
            errors += stream_references(name, stream, self.models)
        for name, talk in self.talk.items():
            if talk.backend == "musetalk" and self.lipsync.weights is None:
                errors.append(f"talk.{name}.backend: musetalk needs lipsync.weights (the MuseTalk models folder)")
            for key in ("out", "audio"):
                if getattr(talk, key) == "webrtc" and not self.api.enabled:
                    errors.append(f"talk.{name}.{key}: webrtc is signalled through the HTTP API; set api.enabled")
                elif getattr(talk, key) == "webrtc" and self.cluster.backend == "ray":
                    errors.append(f"talk.{name}.{key}: webrtc sessions run in one process (a cluster head does not "
                                  "relay their signalling yet)")
        if self.cluster.backend == "ray" and self.mqtt.url == "embedded":
            errors.append("mqtt.url: a cluster needs a broker every node reaches (mqtt://host:port), not 'embedded'")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def webhook_names(self) -> list[str]:
        """Each `[[webhooks]]` hook's name: its own, or webhook-<n> counting from 1."""
        return [h.name or f"webhook-{i + 1}" for i, h in enumerate(self.webhooks)]

    def secrets(self) -> tuple[str, ...]:
        """Literal secrets to scrub from any output, besides URL passwords."""
        out = []
        if self.mqtt.secret():
            out.append(self.mqtt.secret())
        if self.api.token is not None:
            out.append(self.api.token.get_secret_value())
        out += [url_password(u) for stream in self.streams.values() for u in (stream.url, stream.detect_url) if u]
        out += [url_password(u) for t in self.talk.values() for u in (t.audio, t.out)]
        out += [url_password(h.url) for h in self.webhooks]
        out += [h.secret.get_secret_value() for h in self.webhooks if h.secret is not None]
        return tuple(s for s in out if s)


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def _substitute(value: Any, path: str, env: dict[str, str], errors: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):
        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            errors.append((path, f"environment variable {name} is not set"))
            return ""

        return _PLACEHOLDER.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute(v, f"{path}.{k}" if path else k, env, errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, f"{path}[{i}]", env, errors) for i, v in enumerate(value)]
    return value


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_config(
    data: dict[str, Any],
    base_dir: Path,
    source: str = "config",
    env: dict[str, str] | None = None,
    check_files: bool = True,
) -> Config:
    """Validate raw TOML data; raises ConfigError listing every problem with its key path."""
    errors: list[tuple[str, str]] = []
    data = _substitute(data, "", dict(os.environ) if env is None else env, errors)
    data = _with_stream_defaults(data, errors)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = _loc(tuple(err["loc"]))
            msg = _message(err)
            if loc == "" and msg.startswith(("streams.", "talk.", "webhooks[")):
                for part in msg.split("; "):
                    key, _, text = part.partition(": ")
                    errors.append((key, text))
                continue
            errors.append((loc, redact_text(msg)))
        # the later stages too, as far as the raw tables allow: every error of the file at once
        seen = {key for key, _ in errors}
        errors += [(k, m) for k, m in _raw_checks(data, base_dir, check_files) if k not in seen]
        raise ConfigError(errors, source) from None
    if errors:
        raise ConfigError(errors, source)
    config = _resolve_paths(config, base_dir)
    if check_files:
        errors = check_config_files(config)
        if errors:
            raise ConfigError(errors, source)
    return config


def _message(err: Any) -> str:
    """A pydantic error as the config's reports say it."""
    msg = str(err["msg"])
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    msg = msg.removeprefix("Value error, ")
    if "input" in err and not isinstance(err["input"], dict | list):
        msg += f" (got {redact_text(repr(err['input']))[:80]})"
    return msg


def _with_stream_defaults(data: dict[str, Any], errors: list[tuple[str, str]]) -> dict[str, Any]:
    """`[stream_defaults]` under every `[streams.<name>]` table (the stream's own keys win; nested
    tables such as `tracker` and `zones` merge key by key). The defaults are checked once, their
    errors named `stream_defaults.<key>`, and a default in error is not applied (so 32 cameras do
    not repeat one error)."""
    defaults = data.get("stream_defaults")
    if defaults is None:
        return data
    if not isinstance(defaults, dict):
        errors.append(("stream_defaults", "must be a table of stream keys"))
        return {k: v for k, v in data.items() if k != "stream_defaults"}
    bad: set[str | int] = set()
    for key in ("url", "detect_url"):
        if key in defaults:
            errors.append((f"stream_defaults.{key}", f"not a default: each stream names its own {key}"))
            bad.add(key)
    try:
        StreamConfig.model_validate({"url": "x", "model": "m",
                                     **{k: v for k, v in defaults.items() if k not in ("url", "detect_url")}})
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            bad.add(err["loc"][0])
            errors.append((f"stream_defaults.{_loc(tuple(err['loc']))}", redact_text(_message(err))))
    good = {k: v for k, v in defaults.items() if k not in bad}
    streams = data.get("streams")
    if isinstance(streams, dict):
        streams = {n: merged(good, s) if isinstance(s, dict) else s for n, s in streams.items()}
    return {**data, "stream_defaults": good, **({"streams": streams} if streams is not None else {})}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, tables merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _raw_checks(data: dict[str, Any], base_dir: Path, check_files: bool) -> list[tuple[str, str]]:
    """The reference and file checks of a valid config, run on raw tables that failed validation:
    streams naming an unknown model, weights, stream files and avatars that do not exist. Only keys
    whose values have the right type are looked at (a wrong type is already reported)."""
    def table(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {}

    errors: list[tuple[str, str]] = []
    models = table(data.get("models"))
    for name, stream in table(data.get("streams")).items():
        model = table(stream).get("model")
        if isinstance(model, str) and model not in models:
            known = ", ".join(sorted(models)) or "none defined"
            errors.append((f"streams.{name}.model", f"unknown model '{model}' (models: {known})"))
    if not check_files:
        return errors

    def path(value: Any) -> Path | None:
        if not isinstance(value, str) or not value:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else base_dir / p

    weights = {n: w for n, m in models.items() if (w := path(table(m).get("weights"))) is not None}
    files = {f"models.{n}.classes_file": p for n, m in models.items()
             if (p := path(table(m).get("classes_file"))) is not None}
    files |= {f"streams.{n}.{key}": local for n, st in table(data.get("streams")).items()
              for key in ("url", "detect_url")
              if table(st).get("enabled", True) is not False and isinstance(url := table(st).get(key), str)
              and is_local_file(url) and (local := path(url)) is not None}
    talks = {n: table(t) for n, t in table(data.get("talk")).items() if table(t).get("enabled", True) is not False}
    avatars = {n: a for n, t in talks.items() if (a := path(t.get("avatar"))) is not None}
    files |= {f"talk.{n}.audio": local for n, t in talks.items() if isinstance(audio := t.get("audio"), str)
              and audio not in ("mqtt", "webrtc") and is_local_file(audio) and (local := path(audio)) is not None}
    lipsync = table(data.get("lipsync"))
    version = lipsync.get("version", musetalk_defaults.VERSION)
    musetalk = None
    if (folder := path(lipsync.get("weights"))) is not None and version in ("v15", "v1") and any(
            t.get("backend") == "musetalk" for t in talks.values()):
        musetalk = (folder, str(version))
    piper = {n: v for n, value in table(table(data.get("tts")).get("piper")).items()
             if (v := path(value)) is not None}
    calibrations = {f"models.{n}.calibration": p for n, m in models.items()
                    if table(m).get("cpu_precision") == "int8" and (p := path(table(m).get("calibration")))}
    return errors + _missing_files(weights, files, avatars, musetalk, piper, calibrations)


def _missing_files(weights: dict[str, Path], files: dict[str, Path], avatars: dict[str, Path],
                   musetalk: tuple[Path, str] | None, piper: dict[str, Path],
                   calibrations: dict[str, Path] | None = None) -> list[tuple[str, str]]:
    """The one check (and message) of the files a config names that must exist before anything starts:
    weights (and their kind), other files by their key (local stream files, talk audio, class-name
    files), avatars (each named as resolved against the config's folder), the MuseTalk folder's
    layout, INT8 calibration folders (enough images). Used on a valid config and on raw tables alike."""
    from detectors import missing_weights_message
    from detectors.modelfile import ModelFileError, model_kind
    from detectors.quantize import CalibrationError, calibration_images

    errors: list[tuple[str, str]] = []
    for n, w in weights.items():
        try:
            kind = model_kind(w)
        except ModelFileError as exc:
            errors.append((f"models.{n}.weights", str(exc)))
            continue
        if kind == "pt" and not w.is_file():
            errors.append((f"models.{n}.weights", missing_weights_message(w)))
        elif kind not in ("pt", "yaml") and not w.exists():
            errors.append((f"models.{n}.weights", f"model file not found: {w} (export it with ultralytics, e.g. "
                                                  "yolo export model=best.pt format=onnx, and put it there)"))
    errors += [(key, f"file not found: {p}") for key, p in files.items() if not p.exists()]
    for key, folder in (calibrations or {}).items():
        try:
            calibration_images(folder)
        except CalibrationError as exc:
            errors.append((key, str(exc)))
    errors += [(f"talk.{n}.avatar", f"file not found: {a}") for n, a in avatars.items() if not a.is_file()]
    errors += [(f"tts.piper.{n}", why) for n, p in piper.items() if (why := tts.piper_voice_error(n, p))]
    if musetalk is not None:
        from talkinghead.musetalk import MuseTalkError, check_layout

        try:
            check_layout(*musetalk)
        except MuseTalkError as exc:
            errors.append(("lipsync.weights", str(exc)))
    return errors


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    def under(p: Path) -> Path:
        return p if p.is_absolute() else base_dir / p

    models = {name: m.model_copy(update={"weights": under(m.weights),
                                         "classes_file": m.classes_file and under(m.classes_file),
                                         "calibration": m.calibration and under(m.calibration)})
              for name, m in config.models.items()}
    streams = {name: resolve_stream(s, base_dir) for name, s in config.streams.items()}
    talk = {}
    for name, t in config.talk.items():
        update: dict[str, Any] = {"avatar": t.avatar if t.avatar.is_absolute() else base_dir / t.avatar}
        for key in ("audio", "out"):
            value = getattr(t, key)
            if value not in ("mqtt", "webrtc") and is_local_file(value) and not Path(value).is_absolute():
                update[key] = str(base_dir / value)
        talk[name] = t.model_copy(update=update)
    lipsync = config.lipsync
    if lipsync.weights is not None and not lipsync.weights.is_absolute():
        lipsync = lipsync.model_copy(update={"weights": base_dir / lipsync.weights})
    api = config.api
    if api.jobs_dir is not None and not api.jobs_dir.is_absolute():
        api = api.model_copy(update={"jobs_dir": base_dir / api.jobs_dir})
    media_dirs = api.media_dirs if api.media_dirs is not None else [base_dir]
    api = api.model_copy(update={"media_dirs": [d if d.is_absolute() else base_dir / d for d in media_dirs]})
    mqtt = config.mqtt.model_copy(
        update={
            k: base_dir / v
            for k in ("ca_file", "cert_file", "key_file")
            if (v := getattr(config.mqtt, k)) is not None and not v.is_absolute()
        }
    )
    events = config.events
    if events.store is not None and not events.store.is_absolute():
        events = events.model_copy(update={"store": base_dir / events.store})
    tts_cfg = config.tts.model_copy(update={"piper": {n: under(p) for n, p in config.tts.piper.items()}})
    record = config.record
    if record.dir is not None and not record.dir.is_absolute():
        record = record.model_copy(update={"dir": base_dir / record.dir})
    return config.model_copy(
        update={
            "record": record,
            "tts": tts_cfg,
            "models": models,
            "streams": streams,
            "talk": talk,
            "lipsync": lipsync,
            "api": api,
            "events": events,
            "mqtt": mqtt,
        }
    )


def resolve_stream(cfg: StreamConfig, base_dir: Path) -> StreamConfig:
    """A stream's file URL made absolute against the config's folder (as at load)."""
    update = {}
    for key in ("url", "detect_url"):
        url = getattr(cfg, key)
        if url is not None and is_local_file(url):
            p = Path(url.removeprefix("file:"))
            update[key] = str(p if p.is_absolute() else base_dir / p)
    return cfg.model_copy(update=update) if update else cfg


def check_config_files(config: Config) -> list[tuple[str, str]]:
    """Files the config names that must exist before anything starts."""
    talks = {n: t for n, t in config.talk.items() if t.enabled}
    musetalk = None
    if config.lipsync.weights is not None and any(t.backend == "musetalk" for t in talks.values()):
        musetalk = (config.lipsync.weights, config.lipsync.version)
    files = {f"models.{n}.classes_file": m.classes_file for n, m in config.models.items() if m.classes_file}
    files |= {f"streams.{n}.{key}": Path(u) for n, s in config.streams.items() for key in ("url", "detect_url")
              if s.enabled and (u := getattr(s, key)) is not None and is_local_file(u)}
    files |= {f"talk.{n}.audio": Path(t.audio) for n, t in talks.items()
              if t.audio not in ("mqtt", "webrtc") and is_local_file(t.audio)}
    calibrations = {f"models.{n}.calibration": m.calibration for n, m in config.models.items()
                    if m.cpu_precision == "int8" and m.calibration is not None}
    return _missing_files({n: m.weights for n, m in config.models.items()}, files,
                          {n: t.avatar for n, t in talks.items()}, musetalk, config.tts.piper, calibrations)


def read_toml(path: Path) -> dict[str, Any]:
    """The config file's raw tables (before `${ENV}` substitution and the overlay)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([("", f"cannot read config file: {exc.strerror or exc}")], str(path)) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([("", f"not valid TOML: {exc}")], str(path)) from None


def load_config(
    path: str | Path, env: dict[str, str] | None = None, check_files: bool = True, overlay: bool = True
) -> Config:
    """Read and validate a config file with its overlay of runtime changes (see `pipeline.overlay`);
    raises ConfigError (with key paths) on any problem."""
    from .overlay import OverlayError, apply_overlay, apply_talk_overlay, overlay_path, read_overlay, read_talk_overlay

    path = Path(path)
    data = read_toml(path)
    source = str(path)
    if overlay:
        extra = overlay_path(path)
        try:
            entries, talk = read_overlay(extra), read_talk_overlay(extra)
        except OverlayError as exc:
            raise ConfigError([("", str(exc))], f"{path} + {extra.name}") from None
        if entries or talk:
            source = f"{path} + {extra.name}"
        if entries:
            streams = data.get("streams", {})
            data["streams"] = apply_overlay(streams if isinstance(streams, dict) else {}, entries)
        if talk:
            sessions = data.get("talk", {})
            data["talk"] = apply_talk_overlay(sessions if isinstance(sessions, dict) else {}, talk)
    return parse_config(data, path.resolve().parent, source, env=env, check_files=check_files)
