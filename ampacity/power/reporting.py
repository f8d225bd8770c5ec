"""When a node agent's sample is worth an API write (pure: the agent and the reaction benchmark use it).

Writing every sample (once a second per node) makes the API server and etcd carry ~N writes
a second for N nodes while the row sits still. The gate writes a sample when it says
something new: anything but power changed (a limit or clock lock taking effect, a fault,
fail-safe, the pod map, a new assignment generation), the node's power moved beyond a
deadband since the last write, or the heartbeat is due (half the budget's staleness, so the
operator always has telemetry it may trust). A surge crosses the deadband at once, so the
reaction is as fast as with a write per sample.

Where the sample also reached the operator the fast way (the power telemetry endpoint), the
status is the slow, durable view only, and its heartbeat is `offloaded_heartbeat_seconds`. The
operator runs the same gate on the fast reports to decide which are worth a policy round.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ReportPolicy:
    """The gate's settings."""

    #: Write when the node's total power moved by more than this fraction of its GPUs' summed
    #: maximum limits since the last write (5 % of 8 x 700 W = 280 W)...
    node_deadband_fraction: float = 0.05
    #: ... or any one GPU's power by more than this fraction of its maximum limit.
    gpu_deadband_fraction: float = 0.15
    #: Heartbeat as a fraction of the assignment's staleness (the operator's freshness window).
    heartbeat_fraction: float = 0.5
    #: Heartbeat with no staleness to go by (no assignment yet).
    default_heartbeat_seconds: float = 5.0
    #: Heartbeat of a status whose samples reach the operator the fast way.
    offloaded_heartbeat_seconds: float = 60.0


@dataclass(frozen=True)
class _Written:
    at: float
    gpu_watts: Mapping[str, float]
    key: Hashable


class ReportGate:
    """Remembers the last write and says whether a new sample is news."""

    def __init__(self, policy: ReportPolicy | None = None) -> None:
        self.policy = policy or ReportPolicy()
        self._last: _Written | None = None

    def is_news(
        self,
        now: float,
        key: Hashable,
        gpu_watts: Mapping[str, float],
        max_watts: Mapping[str, float],
        staleness_seconds: float | None,
        offloaded: bool = False,
    ) -> bool:
        """`key` holds everything but power; `gpu_watts` and `max_watts` are by GPU UUID;
        `offloaded`: the operator already has this sample the fast way.
        A True answer counts as written: call `failed` if the write then fails."""
        p, last = self.policy, self._last
        if offloaded:
            heartbeat = p.offloaded_heartbeat_seconds
        elif staleness_seconds and staleness_seconds > 0:
            heartbeat = staleness_seconds * p.heartbeat_fraction
        else:
            heartbeat = p.default_heartbeat_seconds
        news = (
            last is None
            or last.key != key
            or now - last.at >= heartbeat
            or abs(sum(gpu_watts.values()) - sum(last.gpu_watts.values()))
            > p.node_deadband_fraction * sum(max_watts.values())
            or any(
                abs(w - last.gpu_watts.get(uuid, 0.0)) > p.gpu_deadband_fraction * max_watts.get(uuid, 0.0)
                for uuid, w in gpu_watts.items()
            )
        )
        if news:
            self._last = _Written(now, dict(gpu_watts), key)
        return news

    def failed(self) -> None:
        """The write the last True answer allowed did not happen: the next sample is news."""
        self._last = None
