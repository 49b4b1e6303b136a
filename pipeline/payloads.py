"""Every JSON message framegrid publishes, typed once: the MQTT payloads (`<prefix>/...`, see
`pipeline.topics`) and the HTTP answers that carry the same figures (`/api/stats`, `/api/cluster`).

They are `TypedDict`s: plain dicts at run time (nothing is converted on the frame path; MQTT renders
them with `json.dumps`), checked by mypy where they are built, and the response models of the HTTP
routes that return them (FastAPI documents and validates them from these classes; a key not declared here is refused,
not dropped). Each carries
`v` = `PAYLOAD_VERSION` (`EVENT_VERSION` for events), raised when a field changes meaning or goes
away. Parts whose keys grow with the deployment (a talk session's figures, the lip-sync pool's
slots, a stream's per-stage times) are typed as open mappings.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired

from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict  # the one pydantic reads on Python < 3.12

from streams.disk import DiskFigures
from streams.loopwatch import LoopFigures

# as response models: a key a payload carries but its type does not declare is an error, never
# dropped silently (what HTTP answers must equal what MQTT carries)
STRICT = ConfigDict(extra="forbid")

# -- <prefix>/streams/<name>/state (retained) ------------------------------------------------------------


@with_config(STRICT)
class StreamStatePayload(TypedDict):
    v: int
    stream: str
    state: str  # streams.StreamState's values
    since: float  # unix time the state began
    reconnects: int
    error: str | None
    model: str
    url: str | None  # redacted
    node: NotRequired[str]  # on a cluster: the node it runs on


@with_config(STRICT)
class MovingPayload(TypedDict):
    """A cluster head's word on a stream's or session's state topic while it moves to another node."""

    v: int
    state: Literal["moving"]
    node: str  # where it goes
    reason: str
    since: float
    stream: NotRequired[str]
    session: NotRequired[str]


# -- <prefix>/devices (retained) -----------------------------------------------------------------------------


@with_config(STRICT)
class SlotFacts(TypedDict):
    model: str
    device: str
    state: str  # healthy | restarting | failed | ...
    restarts: int
    errors: int
    streams: list[str]
    last_error: str | None


@with_config(STRICT)
class DevicesPayload(TypedDict):
    v: int
    at: float
    slots: dict[str, SlotFacts]


# -- <prefix>/talk/<session>/state (retained) ----------------------------------------------------------------


@with_config(STRICT)
class TalkStatePayload(TypedDict):
    """The head of a session's state message; the session's figures (frames, late, viewers, ...) follow
    in the same object (`TalkSessions.snapshot`)."""

    v: int
    session: str
    state: str
    at: float
    error: str | None
    node: NotRequired[str]


# -- <prefix>/streams/<name>/detections ------------------------------------------------------------------


@with_config(STRICT)
class DetectionsPayload(TypedDict):
    v: int
    stream: str
    seq: int  # results published for this stream so far, in order
    model: str
    frame: int
    pts: float | None
    captured_at: float
    inferred_at: float
    published_at: float
    latency_ms: float
    width: int
    height: int
    timings_ms: dict[str, float]
    detections: list[dict[str, Any]]  # box, score, class (and track_id when tracked)
    node: NotRequired[str]


# -- <prefix>/events, and the stored events' state ---------------------------------------------------------


@with_config(STRICT)
class Crossing(TypedDict):
    line: str
    direction: Literal["in", "out"]
    at: float


@with_config(STRICT)
class ObjectState(TypedDict):
    """A tracked object as an event sees it (before and after the change)."""

    id: str  # <stream>-<track id>-<first seen, ms>: the event's id
    track_id: int
    label: str
    score: float
    best_score: float
    box: list[float]
    zones: list[str]  # the zones it is in now
    entered_zones: list[str]
    crossings: list[Crossing]
    first_seen: float
    last_seen: float
    stationary: bool
    has_snapshot: bool
    attributes: NotRequired[dict[str, Any]]  # secondary models' top label and score, by model (stored events
    # from before secondary models have none)


@with_config(STRICT)
class EventPayload(TypedDict):
    v: int  # EVENT_VERSION
    stream: str
    type: str  # new | update | end (and `_best`, internal: a better frame for the snapshot, never published)
    before: ObjectState | None
    after: ObjectState | None
    changed: list[str]  # entered:<zone>, left:<zone>, crossed:<line>:<direction>, stationary, moving, ...


# -- <prefix>/stats and GET /api/stats -----------------------------------------------------------------


@with_config(STRICT)
class LatencyFigures(TypedDict):
    p50: float | None
    p95: float | None
    max: float | None


@with_config(STRICT)
class StreamCounts(TypedDict):
    """A stream's counters and rates (`pipeline.core.stats.StreamStats.snapshot`)."""

    decoded: int
    dispatched: int
    processed: int
    fps_in: float
    fps_processed: float
    drops: dict[str, int]  # stale, too_old, error
    latency_ms: LatencyFigures
    stage_ms_p50: dict[str, float | None]


@with_config(STRICT)
class StreamFigures(StreamCounts):
    state: str
    decode_errors: int
    corrupt_frames: int
    shed_packets: int
    reconnects: int


@with_config(STRICT)
class ExecutorFigures(TypedDict):
    state: str
    healthy: bool
    batches: int
    frames: int
    errors: int
    batch_size: int
    mean_batch: float | None
    service_ms_per_frame: float | None


@with_config(STRICT)
class LoadVerdict(TypedDict):
    status: Literal["ok", "overloaded"]
    reasons: list[str]  # decode-bound, inference-bound
    detail: str | None


@with_config(STRICT)
class ProcessFigures(TypedDict):
    rss_mb: float | None
    fds: int | None
    threads: int
    tasks: int | None
    loop: LoopFigures | None  # the event loop's stalls (streams.loopwatch); None where nothing watches it


@with_config(STRICT)
class ResultFigures(TypedDict):
    sink_errors: int


@with_config(STRICT)
class WebhookFigures(TypedDict):
    url: str  # redacted
    queued: int  # waiting now
    sent: int  # delivered (HTTP 2xx)
    failed: int  # given up after the retries, or refused (4xx)
    dropped: int  # not queued: the hook's queue was full
    retried: int  # attempts after a first one
    last_error: str | None


@with_config(STRICT)
class RecorderFigures(TypedDict):
    clips_written: int
    clips_failed: int  # not kept (a write error, a full disk, no packets)
    clips_open: int  # being written now
    bytes_written: int
    ring_packets: int  # the packet ring: pre-roll plus one GOP, and what open clips have yet to write
    ring_bytes: int
    ring_s: float
    cut_packets: int  # dropped from a ring over its bound (a stalled disk): clips cut short
    disk_full: bool  # the last clip failed for want of space (cleared by the next one written)
    last_error: str | None


@with_config(STRICT)
class RecordingFigures(TypedDict):
    streams: dict[str, RecorderFigures]
    media_bytes: int  # clips and event snapshots the store knows of, at its last check
    media_limit_bytes: int  # [record] max_gb
    media_deleted: int  # events whose media retention deleted (their events stay)


@with_config(STRICT)
class StatsPayload(TypedDict):
    v: int
    at: float
    uptime_s: float
    load: LoadVerdict
    streams: dict[str, StreamFigures]
    mqtt: dict[str, Any]  # the publisher's counters
    results: ResultFigures
    talk: dict[str, dict[str, Any]]  # per session: its figures
    lipsync: dict[str, Any] | None  # the lip-sync pool (batches, slots), once started
    executors: dict[str, ExecutorFigures]
    webhooks: dict[str, WebhookFigures]
    recording: RecordingFigures | None  # None: events (and so clips) off
    disk: dict[str, DiskFigures]  # per writer that has written (event store, snapshots, clips, overlay, ...)
    process: ProcessFigures


# -- <prefix>/cluster (retained) and GET /api/cluster; GET /api/stats on a head -------------------------


@with_config(STRICT)
class NodeFacts(TypedDict):
    state: str  # starting | up | drained | lost | stopped
    streams: list[str]
    sessions: list[str]
    throughput: dict[str, float]  # frames/s its slots serve, by model
    error: str | None


@with_config(STRICT)
class ClusterPayload(TypedDict):
    v: int
    at: float
    nodes: dict[str, NodeFacts]
    unplaced: list[str]
    unplaced_sessions: list[str]
    control_calls_per_s: float


@with_config(STRICT)
class ClusterStatsPayload(TypedDict):
    """`/api/stats` on a cluster head: its placement and every node's own stats payload."""

    v: int
    at: float
    cluster: ClusterPayload
    nodes: dict[str, StatsPayload]
