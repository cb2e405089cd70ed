"""The control plane's Prometheus metrics, on an injected registry, read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from weir_proto.control.v1 import deployments_pb2

REPORTED_STATES = tuple(
    name.lower() for name, _ in deployments_pb2.EndpointStatus.State.items() if name != "STATE_UNSPECIFIED"
)


class ControlMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.uploads = Counter(
            "weir_control_uploads", "Model version uploads by result (ready, failed).", ["result"], registry=registry
        )
        self.desired_state_changes = Counter(
            "weir_control_desired_state_changes", "Deploys, undeploys and alias moves pushed to data planes.",
            registry=registry,
        )  # fmt: skip
        for result in ("ready", "failed"):
            self.uploads.labels(result)


class ReplicaCollector(Collector):
    """Attached data planes and their endpoint states, from the hub at scrape time."""

    def __init__(self, replicas: Callable[[], list[deployments_pb2.ReplicaInfo]]) -> None:
        self._replicas = replicas

    def collect(self) -> Iterator[Metric]:
        replicas = self._replicas()
        attached = GaugeMetricFamily("weir_control_replicas_attached", "Data planes attached now.")
        attached.add_metric([], len(replicas))
        states = GaugeMetricFamily(
            "weir_control_replica_endpoints", "Endpoints per replica by state.", labels=["replica", "state"]
        )
        for replica in replicas:
            # every state, 0 included: a failure that is over reads 0, not a series that just stops
            counts = dict.fromkeys(REPORTED_STATES, 0)
            for status in replica.status.endpoints:
                name = deployments_pb2.EndpointStatus.State.Name(status.state).lower()
                counts[name] = counts.get(name, 0) + 1
            for state, count in sorted(counts.items()):
                states.add_metric([replica.replica_id, state], count)
        yield attached
        yield states
