"""framegrid's core: config, planning, ingest, the slot machinery, results, telemetry, the composer and the CLI."""

from .app import Pipeline
from .broker import EmbeddedBroker
from .config import Config, ConfigError, ModelConfig, MqttConfig, StreamConfig, load_config, parse_config
from .detect import DetectJobs, StreamFeed, default_detector_factory
from .errors import FramegridError, PlacementError, PoolError, SlotError, SlotHang, SlotOutOfMemory
from .ingest import StreamRecord
from .planning import Plan, plan_models
from .publisher import Publisher
from .results import PAYLOAD_VERSION, Result, Results, ResultSink
from .slots import Batcher, PoolSettings, Slot, SlotPool
from .stats import StreamStats

__all__ = [
    "PAYLOAD_VERSION",
    "Batcher",
    "Config",
    "ConfigError",
    "DetectJobs",
    "EmbeddedBroker",
    "FramegridError",
    "ModelConfig",
    "MqttConfig",
    "Pipeline",
    "PlacementError",
    "Plan",
    "PoolError",
    "PoolSettings",
    "Publisher",
    "Result",
    "ResultSink",
    "Results",
    "Slot",
    "SlotError",
    "SlotHang",
    "SlotOutOfMemory",
    "SlotPool",
    "StreamConfig",
    "StreamFeed",
    "StreamRecord",
    "StreamStats",
    "default_detector_factory",
    "load_config",
    "parse_config",
    "plan_models",
]
