"""The node agent's Prometheus metrics, in a registry of its own.

A collector renders the latest sample on every scrape, so a scrape always shows one
consistent round (power, limits and energy read together) rather than gauges updated
one by one mid-round.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class GpuSample:
    """One GPU as read in one round."""

    index: int
    power_watts: float
    energy_joules: float
    limit_watts: float


class AgentMetrics(Collector):
    """Metrics of one node agent; `registry` holds only these."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.samples: tuple[GpuSample, ...] = ()
        self.failsafe = False
        self.cap_changes: dict[int, int] = {}
        self.failsafe_entries = 0
        self.api_errors = 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def record(self, samples: Sequence[GpuSample], failsafe: bool) -> None:
        if failsafe and not self.failsafe:
            self.failsafe_entries += 1
        self.samples, self.failsafe = tuple(samples), failsafe

    def cap_changed(self, index: int) -> None:
        self.cap_changes[index] = self.cap_changes.get(index, 0) + 1

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        start_http_server(port, addr=address, registry=self.registry)

    def collect(self) -> Iterator[Metric]:
        labels = ["node", "gpu"]
        power = GaugeMetricFamily("ampacity_gpu_power_watts", "GPU power draw.", labels=labels)
        energy = CounterMetricFamily(
            "ampacity_gpu_energy_joules", "GPU energy since its counter started.", labels=labels
        )
        limit = GaugeMetricFamily(
            "ampacity_gpu_power_limit_watts", "Power limit enforced on the GPU.", labels=labels
        )
        changes = CounterMetricFamily(
            "ampacity_gpu_cap_changes", "Times the agent set a new power limit on the GPU.", labels=labels
        )
        for s in self.samples:
            gpu = [self.node, str(s.index)]
            power.add_metric(gpu, s.power_watts)
            energy.add_metric(gpu, s.energy_joules)
            limit.add_metric(gpu, s.limit_watts)
            changes.add_metric(gpu, self.cap_changes.get(s.index, 0))
        yield from (power, energy, limit, changes)
        failsafe = GaugeMetricFamily(
            "ampacity_node_failsafe", "1 while the agent enforces its safe cap on its own.", labels=["node"]
        )
        failsafe.add_metric([self.node], 1.0 if self.failsafe else 0.0)
        yield failsafe
        entries = CounterMetricFamily(
            "ampacity_node_failsafe_entries", "Times the agent fell back to its safe cap.", labels=["node"]
        )
        entries.add_metric([self.node], self.failsafe_entries)
        yield entries
        errors = CounterMetricFamily(
            "ampacity_node_agent_api_errors", "Failed requests to the API server.", labels=["node"]
        )
        errors.add_metric([self.node], self.api_errors)
        yield errors
