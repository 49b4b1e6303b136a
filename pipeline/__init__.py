"""framegrid's core: config, planning, ingest, the slot machinery, results, telemetry, the composer and the CLI."""

from pipeline.core.detect import DetectJobs, StreamFeed, default_detector_factory
from pipeline.core.ingest import StreamRecord
from pipeline.core.planning import Plan, plan_models
from pipeline.core.results import Result, Results, ResultSink
from pipeline.core.slots import Batcher, Slot, SlotPool
from pipeline.core.stats import StreamStats
from pipeline.mqtt.broker import EmbeddedBroker
from pipeline.mqtt.publisher import Publisher
from pipeline.topics import PAYLOAD_VERSION, Topics

from .app import Pipeline
from .config import Config, ConfigError, ModelConfig, MqttConfig, PoolSettings, StreamConfig, load_config, parse_config
from .errors import FramegridError, PlacementError, PoolError, SlotError, SlotHang, SlotOutOfMemory

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
    "Topics",
    "default_detector_factory",
    "load_config",
    "parse_config",
    "plan_models",
]
