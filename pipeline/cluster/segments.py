"""Offline talking-head segments on a cluster: the lipsync slots of every node as one pool.

`talkinghead.offline.render` cuts a job's voiced frames into segments of one batch and hands
segment k to `submit(jobs, k)`. `ClusterSegments` sends segment k to the k-th lipsync slot of the
cluster (slots of all nodes in turn: node workers' `render_segment`, a Ray actor task that queues
the batch on that node's own lipsync slot, beside its live sessions). A segment whose node dies is
sent to the next slot. What crosses the network per frame is its avatar latents and audio prompt
(~110 kB) and the generated face back (~200 kB); the whole frames, Whisper and the blend stay
where the job runs.

It has the few members of `pipeline.talk.lipsync.LipSyncPool` that rendering uses (`n`, `settings`,
`submit`, `release`), so a talk job renders on a cluster with the same code as on one machine.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("framegrid.cluster")


@dataclass(frozen=True)
class _Settings:
    batch_size: int


class ClusterSegments:
    def __init__(self, slots: list[tuple[Any, int]], batch_size: int) -> None:
        """`slots`: (node worker actor, lipsync slot index on that node) pairs, in the order segments go."""
        if not slots:
            raise ValueError("no node with a lipsync slot is up")
        self.slots = slots
        self.settings = _Settings(batch_size)

    @property
    def n(self) -> int:
        return len(self.slots)

    def submit(self, key: str, jobs: list[Any], slot: int | None = None) -> concurrent.futures.Future[list[Any]]:
        """Segment `jobs` on slot `slot` mod n (thread-safe); on a dead node, on the following slots."""
        out: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
        start = (slot or 0) % self.n
        jobs = [compact(j) for j in jobs]

        def attempt(i: int) -> None:
            actor, local = self.slots[(start + i) % self.n]
            try:
                ref = actor.render_segment.remote(key, jobs, local)
                fut = ref.future()
            except Exception as exc:
                fut = concurrent.futures.Future()
                fut.set_exception(exc)

            def done(f: concurrent.futures.Future[list[Any]]) -> None:
                exc = f.exception()
                if exc is None:
                    out.set_result(list(f.result()))
                elif i + 1 < self.n and _node_gone(exc):
                    log.warning("talk job: a segment's node failed (%s); sent to the next slot", type(exc).__name__)
                    attempt(i + 1)
                else:
                    out.set_exception(exc)

            fut.add_done_callback(done)

        attempt(0)
        return out

    def release(self, key: str) -> None:
        for actor in {id(a): a for a, _ in self.slots}.values():
            with contextlib.suppress(Exception):
                actor.release_segments.remote(key)


def compact(job: Any) -> Any:
    """The job with tensors of their own: a prompt is a row of the whole job's prompt tensor, and a
    pickled view carries its whole storage (a 48 s job sent 92 MB with every 8-frame segment)."""
    from talkinghead.musetalk import LipSyncJob

    return LipSyncJob(job.latents.clone(), job.prompt.clone())


def _node_gone(exc: BaseException) -> bool:
    """A failure of the node or its worker (not of the segment itself, which would fail anywhere)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, WorkerCrashedError

    return isinstance(exc, ActorDiedError | ActorUnavailableError | NodeDiedError | WorkerCrashedError)
