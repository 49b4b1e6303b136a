"""Every MQTT topic framegrid publishes or subscribes to, built in one place.

    <prefix>/availability                         online / offline (Last Will), per process
    <prefix>/stats, <prefix>/devices              periodic figures and device load, per process
    <prefix>/nodes/<node>/{availability,stats,devices}   the same for a cluster node's worker
    <prefix>/cluster                              the cluster head's nodes and placement
    <prefix>/streams/<stream>/detections          every result
    <prefix>/streams/<stream>/state               retained stream state
    <prefix>/streams/<stream>/snapshot/<label>    JPEG of an ended event's best view
    <prefix>/streams/<stream>/objects/<label|all>         retained count of objects tracked now
    <prefix>/streams/<stream>/<zones|lines>/<name>/<...>   retained zone and line counts
    <discovery_prefix>/<component>/<node>/<object>/config  Home Assistant discovery (pipeline/mqtt/homeassistant.py)
    <prefix>/events                               tracked-object events (new / update / end)
    <prefix>/talk/<session>/state                 retained talk session state
    <prefix>/talk/<session>/audio                 PCM pushed into a session (subscribed)

Stream and session names are validated by the config (no `/`, `+` or `#`), so a name is one level.
"""

from __future__ import annotations

from dataclasses import dataclass

PAYLOAD_VERSION = 1  # the `v` of every JSON payload; raised when a field changes meaning or goes away


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic tree of one process under `prefix`; `node` is set on a cluster node's worker, whose
    process-wide topics (availability, stats, devices) are its own while stream topics stay global."""

    prefix: str
    node: str | None = None

    def __post_init__(self) -> None:  # once, not on every result published
        object.__setattr__(self, "prefix", self.prefix.rstrip("/"))

    def _join(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    def _process(self, leaf: str) -> str:
        return self._join("nodes", self.node, leaf) if self.node else self._join(leaf)

    # -- per process --------------------------------------------------------------------------------
    @property
    def availability(self) -> str:
        return self._process("availability")

    @property
    def stats(self) -> str:
        return self._process("stats")

    @property
    def devices(self) -> str:
        return self._process("devices")

    def node_availability(self, node: str) -> str:
        """Another process's availability (the cluster head marks a lost node's worker offline)."""
        return self._join("nodes", node, "availability")

    @property
    def cluster(self) -> str:
        return self._join("cluster")

    @property
    def all(self) -> str:
        """The filter matching every topic under the prefix (ACL hints)."""
        return self._join("#")

    # -- per stream -----------------------------------------------------------------------------------
    def detections(self, stream: str) -> str:
        return self._join("streams", stream, "detections")

    def stream_state(self, stream: str) -> str:
        return self._join("streams", stream, "state")

    def snapshot(self, stream: str, label: str) -> str:
        return self._join("streams", stream, "snapshot", label)

    def stream_count(self, stream: str, kind: str, suffix: str) -> str:
        """A zone's or line's retained count: `kind` is `zones` or `lines`, `suffix` `<name>/<what>`."""
        return self._join("streams", stream, kind, *suffix.split("/"))

    @property
    def events(self) -> str:
        return self._join("events")

    # -- per talk session -------------------------------------------------------------------------------
    def talk_state(self, session: str) -> str:
        return self._join("talk", session, "state")

    def talk_audio(self, session: str) -> str:
        return self._join("talk", session, "audio")

    def talk_say(self, session: str) -> str:
        return self._join("talk", session, "say")

    def talk_events(self, session: str) -> str:
        return self._join("talk", session, "events")

    @property
    def talk_audio_filter(self) -> str:
        return self._join("talk", "+", "audio")
