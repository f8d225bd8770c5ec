"""The node agent's Prometheus metrics, in a registry of its own.

A collector renders the latest sample on every scrape, so a scrape always shows one
consistent round (power, limits and energy read together) rather than gauges updated
one by one mid-round. GPU series carry DCGM exporter's `UUID` and `modelName` labels, so
they join with its series (and dashboards) on the same GPU.
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
    energy_joules: float | None
    limit_watts: float
    uuid: str = ""
    model: str = ""
    clock_mhz: int | None = None


class AgentMetrics(Collector):
    """Metrics of one node agent; `registry` holds only these."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.samples: tuple[GpuSample, ...] = ()
        self.failsafe = False
        self.enforcing = True
        self.cap_changes: dict[int, int] = {}
        self.failsafe_entries = 0
        self.api_errors = 0
        self.status_writes = 0
        self.fast_reports = 0
        self.fast_failures = 0
        self.gpus_lost = 0
        self.nvml_errors: dict[str, int] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def record(self, samples: Sequence[GpuSample], failsafe: bool, enforcing: bool = True) -> None:
        if failsafe and not self.failsafe:
            self.failsafe_entries += 1
        self.samples, self.failsafe, self.enforcing = tuple(samples), failsafe, enforcing

    def cap_changed(self, index: int) -> None:
        self.cap_changes[index] = self.cap_changes.get(index, 0) + 1

    def nvml_error(self, reason: str) -> None:
        self.nvml_errors[reason] = self.nvml_errors.get(reason, 0) + 1

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        start_http_server(port, addr=address, registry=self.registry)

    def collect(self) -> Iterator[Metric]:
        labels = ["node", "gpu", "UUID", "modelName"]
        power = GaugeMetricFamily("ampacity_gpu_power_watts", "GPU power draw.", labels=labels)
        energy = CounterMetricFamily(
            "ampacity_gpu_energy_joules", "GPU energy since its counter started.", labels=labels
        )
        limit = GaugeMetricFamily(
            "ampacity_gpu_power_limit_watts", "Power limit enforced on the GPU.", labels=labels
        )
        clock = GaugeMetricFamily("ampacity_gpu_sm_clock_hertz", "SM clock of the GPU.", labels=labels)
        changes = CounterMetricFamily(
            "ampacity_gpu_cap_changes", "Times the agent set a new power limit on the GPU.", labels=labels
        )
        for s in self.samples:
            gpu = [self.node, str(s.index), s.uuid, s.model]
            power.add_metric(gpu, s.power_watts)
            if s.energy_joules is not None:
                energy.add_metric(gpu, s.energy_joules)
            limit.add_metric(gpu, s.limit_watts)
            if s.clock_mhz is not None:
                clock.add_metric(gpu, s.clock_mhz * 1e6)
            changes.add_metric(gpu, self.cap_changes.get(s.index, 0))
        yield from (power, energy, limit, clock, changes)
        node = [self.node]
        failsafe = GaugeMetricFamily(
            "ampacity_node_failsafe", "1 while the agent enforces its safe cap on its own.", labels=["node"]
        )
        failsafe.add_metric(node, 1.0 if self.failsafe else 0.0)
        yield failsafe
        enforcing = GaugeMetricFamily(
            "ampacity_node_enforcing",
            "1 while every limit and clock lock the agent had to set took effect; 0 when NVML failed.",
            labels=["node"],
        )
        enforcing.add_metric(node, 1.0 if self.enforcing else 0.0)
        yield enforcing
        errors_by_reason = CounterMetricFamily(
            "ampacity_node_agent_nvml_errors",
            "Failed NVML calls (or NVML missing), counted per round, by reason (Nvml<error>).",
            labels=["node", "reason"],
        )
        for reason, count in sorted(self.nvml_errors.items()):
            errors_by_reason.add_metric([self.node, reason], count)
        yield errors_by_reason
        entries = CounterMetricFamily(
            "ampacity_node_failsafe_entries", "Times the agent fell back to its safe cap.", labels=["node"]
        )
        entries.add_metric(node, self.failsafe_entries)
        yield entries
        errors = CounterMetricFamily(
            "ampacity_node_agent_api_errors", "Failed requests to the API server.", labels=["node"]
        )
        errors.add_metric(node, self.api_errors)
        yield errors
        writes = CounterMetricFamily(
            "ampacity_node_agent_status_writes",
            "NodePower status writes (deadband and heartbeat).",
            labels=["node"],
        )
        writes.add_metric(node, self.status_writes)
        yield writes
        fast = CounterMetricFamily(
            "ampacity_node_agent_fast_reports",
            "Samples the operator's power telemetry endpoint answered (the fast way, not etcd).",
            labels=["node"],
        )
        fast.add_metric(node, self.fast_reports)
        yield fast
        fast_failed = CounterMetricFamily(
            "ampacity_node_agent_fast_report_failures",
            "Samples the power telemetry endpoint did not answer (the agent used the API server).",
            labels=["node"],
        )
        fast_failed.add_metric(node, self.fast_failures)
        yield fast_failed
        lost = CounterMetricFamily(
            "ampacity_node_gpus_lost", "GPUs that disappeared from the node.", labels=["node"]
        )
        lost.add_metric(node, self.gpus_lost)
        yield lost
