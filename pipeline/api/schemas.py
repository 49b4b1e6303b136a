"""The control plane's request and answer types (the OpenAPI schema), shared by one process and a
cluster head."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from pipeline.config import MaskConfig, Name, StreamConfig, TalkConfig, VoiceName
from talkinghead.tts import MAX_TEXT


class Health(BaseModel):
    status: str = Field(description="always 'ok' while the process serves requests")
    uptime_s: float


class Ready(BaseModel):
    ready: bool
    reasons: list[str] = Field(description="what is not ready yet (empty when ready)")


class Latency(BaseModel):
    p50: float | None = None
    p95: float | None = None
    max: float | None = None


class MainStreamInfo(BaseModel):
    read: str = Field(description="recorded (read as packets for the recorder) | on demand (a keyframe at start "
                      "and per main snapshot)")
    size: list[int] | None = Field(None, description="its width and height (published boxes are in these pixels)")
    state: str = Field(description="recorded: the reader's state; on demand: connecting | ok | reconnecting | failed")
    error: str | None = None
    since: float | None = None
    reconnects: int = 0
    packets: int = 0
    grabs: int = Field(0, description="keyframes grabbed on demand")
    keyframe_age_s: float | None = Field(None, description="age of its newest keyframe (the main snapshot)")


class StreamInfo(BaseModel):
    name: str
    url: str = Field(description="the source URL with its password masked")
    model: str
    max_fps: float | None
    enabled: bool
    state: str = Field(description="starting | connecting | running | reconnecting | failed | refused | stopped | "
                       "disabled")
    since: float | None = Field(None, description="unix time the state began")
    error: str | None = None
    reconnects: int = 0
    fps_in: float = 0.0
    fps_out: float = 0.0
    decoded: int = 0
    dispatched: int = 0
    published: int = 0
    drops: dict[str, int] = Field(default_factory=dict, description="frames dropped, by reason")
    latency_ms: Latency = Field(default_factory=Latency)
    objects: dict[str, int] = Field(default_factory=dict, description="objects in its newest result, by label")
    slot: str | None = Field(None, description="the executor slot serving it")
    device: str | None = None
    node: str | None = Field(None, description="on a cluster: the node running it")
    main: MainStreamInfo | None = Field(None, description="with detect_url: how the camera's main stream is read")
    config: dict[str, Any] = Field(description="the stream's settings (passwords masked)")


class NewStream(StreamConfig):
    """A `[streams.<name>]` table plus its name."""

    name: Name


class StreamPatch(BaseModel):
    model_config = {"extra": "forbid"}
    max_fps: float | None = Field(None, gt=0, le=1000, description="null = no limit")
    model: str | None = None
    enabled: bool | None = None
    classes: list[str] | None = Field(None, description="keep only these labels (null = all)")
    confidence: float | None = Field(None, ge=0, le=1)
    label_confidence: dict[str, float] | None = None
    min_area: float | None = Field(None, ge=0, le=1)
    max_area: float | None = Field(None, gt=0, le=1)
    masks: dict[str, MaskConfig] | None = None


class ModelInfo(BaseModel):
    name: str
    backend: str
    imgsz: int
    loaded: bool = Field(description="its slots run (in one process), or a node serves it (on a cluster)")
    error: str | None = None
    classes: list[str] = Field(default_factory=list)
    nodes: list[str] | None = Field(None, description="on a cluster: the nodes serving it")


class SlotInfo(BaseModel):
    name: str
    model: str
    state: str
    healthy: bool
    restarts: int
    errors: int
    streams: list[str]
    service_ms_per_frame: float | None
    last_error: str | None


class DeviceOut(BaseModel):
    id: str
    kind: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_percent: float | None
    temperature_c: float | None
    drained: bool
    slots: list[SlotInfo]
    node: str | None = Field(None, description="on a cluster: the node it belongs to")


class Move(BaseModel):
    stream: str
    source: str
    target: str


class Moves(BaseModel):
    device: str
    moved: list[Move]


class Say(BaseModel):
    """Text a session speaks (espeak-ng), after what it was given before."""

    model_config = {"extra": "forbid"}
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    voice: VoiceName | None = Field(None, description="espeak-ng voice or a [tts.piper] voice (default: [tts] voice)")
    interrupt: bool = Field(False, description="barge-in: cut what is being said (with a short fade) and drop "
                            "what waits, then say this")


class Utterance(BaseModel):
    id: str = Field(description="the utterance's id (<session>-<n>)")


class NewSession(TalkConfig):
    """A `[talk.<name>]` table plus its name."""

    name: Name


class SessionInfo(BaseModel):
    name: str
    state: str
    error: str | None = None
    backend: str | None = None
    slot: str | None = None
    node: str | None = Field(None, description="on a cluster: the node running it")
    figures: dict[str, Any] = Field(default_factory=dict, description="frames, fps, latency (as in stats)")


class JobInfo(BaseModel):
    id: str
    state: str = Field(description="queued | running | done | failed | cancelled")
    backend: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: float = Field(description="0-1")
    frames: int = 0
    total_frames: int | None = None
    error: str | None = None
    video: str | None = Field(None, description="URL of the result once done")


class ClipInfo(BaseModel):
    size: int = Field(description="bytes")
    start: float = Field(description="unix time of its first frame (a keyframe at or before the event's start "
                         "minus pre_s)")
    end: float = Field(description="unix time of its last frame")


class EventInfo(BaseModel):
    id: str
    stream: str
    label: str
    track_id: int
    start_time: float
    end_time: float | None = Field(description="null while the object is still seen")
    best_score: float
    zones: list[str] = Field(description="zones it entered")
    has_snapshot: bool
    clip: ClipInfo | None = Field(None, description="its clip (GET /api/events/{id}/clip.mp4), once written")
    state: dict[str, Any] = Field(description="the object's last state (as in the MQTT event's `after`)")


class RecordingInfo(BaseModel):
    id: str = Field(description="GET /api/recordings/{id}.mp4 serves it")
    stream: str
    start_time: float = Field(description="unix time of its first frame")
    end_time: float = Field(description="unix time of its last frame")
    size: int = Field(description="bytes")


class Problem(BaseModel):
    detail: str
