"""framegrid on a Ray cluster: a head placing streams on one worker per node.

`cluster.backend = "local"` (the default) never imports this package's Ray parts; `"ray"` makes
`framegrid run` start a `ClusterHead` instead of a `Pipeline` (see `head.py` and `worker.py`).
"""

from __future__ import annotations

__all__ = ["ClusterHead", "NodeWorker"]


def __getattr__(name: str) -> object:
    if name == "ClusterHead":
        from .head import ClusterHead

        return ClusterHead
    if name == "NodeWorker":
        from .worker import NodeWorker

        return NodeWorker
    raise AttributeError(name)
