"""Which pod holds which GPU, from the kubelet's pod-resources API.

The kubelet serves `v1.PodResourcesLister` over gRPC on a unix socket
(`/var/lib/kubelet/pod-resources/kubelet.sock`); `List` returns every pod's containers with
the devices the device plugin allocated them. For NVIDIA's device plugin the device IDs of
`nvidia.com/gpu` are the GPUs' UUIDs (with MIG or time-slicing strategies they carry a suffix
after `::`, which is stripped). The stubs are generated from the published proto
(k8s.io/kubelet `pkg/apis/podresources/v1/api.proto`) by `tools/gen-podresources.sh`.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from agents.podresources.v1 import api_pb2, api_pb2_grpc
from ampacity.api.gpu import GPU_RESOURCE

#: Where the kubelet serves the pod-resources API (the chart mounts the folder read-only).
KUBELET_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"


@dataclass(frozen=True, order=True)
class PodRef:
    """A pod the kubelet gave a GPU to."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class PodResourcesError(Exception):
    """The kubelet's pod-resources API did not answer (no socket, kubelet down, timeout)."""


class PodResourcesClient:
    """Reads the GPU-to-pod map from the kubelet; one channel for the agent's lifetime."""

    def __init__(
        self, socket: str = KUBELET_SOCKET, timeout: float = 2.0, resource: str = GPU_RESOURCE
    ) -> None:
        self.socket, self.timeout, self.resource = socket, timeout, resource
        self._channel = grpc.aio.insecure_channel(f"unix://{socket}")
        self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)  # type: ignore[no-untyped-call]

    async def gpu_pods(self) -> dict[str, PodRef]:
        """GPU UUID -> the pod holding it."""
        try:
            response = await self._stub.List(api_pb2.ListPodResourcesRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise PodResourcesError(f"{self.socket}: {error.code().name}: {error.details()}") from error
        return gpu_pods(response, self.resource)

    async def close(self) -> None:
        await self._channel.close()


def gpu_pods(response: api_pb2.ListPodResourcesResponse, resource: str = GPU_RESOURCE) -> dict[str, PodRef]:
    """The UUID -> pod map of one `List` answer."""
    pods: dict[str, PodRef] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            for devices in container.devices:
                if devices.resource_name != resource:
                    continue
                for device in devices.device_ids:
                    pods[device.split("::", 1)[0]] = PodRef(pod.namespace, pod.name)
    return pods
