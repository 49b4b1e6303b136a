"""framegrid's core: config, scheduler, executors, publishing, the running graph and the CLI."""

from .app import Pipeline, default_detector_factory
from .broker import EmbeddedBroker
from .config import Config, ConfigError, ModelConfig, MqttConfig, StreamConfig, load_config, parse_config
from .executor import ExecutorSlot
from .publisher import Publisher
from .result import PAYLOAD_VERSION, Result
from .scheduler import Scheduler, StreamHandle
from .stats import StreamStats

__all__ = [
    "PAYLOAD_VERSION",
    "Config",
    "ConfigError",
    "EmbeddedBroker",
    "ExecutorSlot",
    "ModelConfig",
    "MqttConfig",
    "Pipeline",
    "Publisher",
    "Result",
    "Scheduler",
    "StreamConfig",
    "StreamHandle",
    "StreamStats",
    "default_detector_factory",
    "load_config",
    "parse_config",
]
