"""A cluster node's worker: framegrid's own `Pipeline` for the streams the head placed on this node.

The head makes one long-lived Ray actor of this class per node (pinned to it, named after it, in
the cluster's namespace, detached: it outlives a head that crashes). Everything heavy stays here:
sources, decode, executor slots, tracking, events and MQTT publishing of its streams. What crosses
the network is control (add or remove a stream, a ping) and a short description back; frames never
leave the node. This module does not import Ray: the head wraps the class with `ray.remote`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..config import ApiConfig, Config, StreamConfig

log = logging.getLogger("framegrid.cluster")


def worker_config(config: Config) -> Config:
    """The head's config as a node worker runs it: no streams until placed, no HTTP API, one process."""
    return config.model_copy(update={"streams": {}, "api": ApiConfig(enabled=False),
                                     "cluster": config.cluster.model_copy(update={"backend": "local"})})


class NodeWorker:
    """One node's framegrid. Async methods: they run on the actor's event loop, as the pipeline does."""

    def __init__(self, config: Config, node: str, config_path: Path | None = None) -> None:
        self.config = worker_config(config)
        self.node = node
        self.config_path = config_path
        self.pipeline: Any = None
        self.started_at = time.time()

    async def start(self) -> dict[str, Any]:
        """Start the pipeline and load every model (idempotent: a restarted head calls it again and
        learns what runs here). -> `describe()`."""
        if self.pipeline is None:
            from ..app import Pipeline
            from ..cli import setup_logging

            setup_logging(self.config.log.level, self.config.secrets())
            self.pipeline = Pipeline(self.config, config_path=self.config_path, node=self.node)
            await self.pipeline.__aenter__()
            failed = await self.pipeline.load_models()
            for model, why in failed.items():
                log.error("node %s: model %s did not start: %s", self.node, model, why)
            log.info("node %s: worker ready (%s)", self.node, ", ".join(
                f"{m} {fps:.0f} frames/s" for m, fps in self.pipeline.throughput().items()) or "no model")
        return self.describe()

    def describe(self) -> dict[str, Any]:
        p = self.pipeline
        return {
            "node": self.node,
            "started_at": self.started_at,
            "throughput": p.throughput(),
            "model_errors": dict(p.model_errors),
            "streams": {name: {"model": r.model, "state": r.state.value} for name, r in p.streams.items()},
        }

    async def ping(self) -> dict[str, Any]:
        return self.describe()

    async def add_stream(self, name: str, cfg: StreamConfig) -> None:
        await self.pipeline.add_stream(name, cfg)

    async def remove_stream(self, name: str) -> None:
        if name in self.pipeline.streams:
            await self.pipeline.remove_stream(name)

    async def stop(self) -> None:
        """Stop the pipeline (its streams' states are cleared, its availability goes offline)."""
        if self.pipeline is not None:
            pipeline, self.pipeline = self.pipeline, None
            await pipeline.__aexit__(None, None, None)
