"""The GPU-to-pod map against a gRPC server that implements the kubelet's real proto.

The server is the generated `PodResourcesListerServicer` from k8s.io/kubelet's
`pkg/apis/podresources/v1/api.proto`, served on a unix socket in a temp dir as the kubelet
serves it; the answer is shaped like NVIDIA's device plugin's (UUIDs as device IDs).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agents.pod_resources import PodRef, PodResourcesClient, PodResourcesError
from agents.podresources.v1 import api_pb2, api_pb2_grpc

GPU_A = "GPU-aaaaaaaa-0000-4000-8000-000000000000"
GPU_B = "GPU-bbbbbbbb-0000-4000-8000-000000000001"
GPU_C = "GPU-cccccccc-0000-4000-8000-000000000002"


class Kubelet(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def List(  # the proto's method name
        self, request: api_pb2.ListPodResourcesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListPodResourcesResponse:
        self.calls += 1
        devices = api_pb2.ContainerDevices
        return api_pb2.ListPodResourcesResponse(
            pod_resources=[
                api_pb2.PodResources(
                    name="chat-0",
                    namespace="serving",
                    containers=[
                        api_pb2.ContainerResources(
                            name="engine",
                            devices=[
                                devices(resource_name="nvidia.com/gpu", device_ids=[GPU_A, GPU_B]),
                                devices(resource_name="example.com/nic", device_ids=["mlx5_0"]),
                            ],
                            cpu_ids=[2, 3],
                        ),
                        api_pb2.ContainerResources(name="sidecar"),
                    ],
                ),
                # Time-sliced sharing: the device plugin appends ::<replica> to the UUID.
                api_pb2.PodResources(
                    name="train-0",
                    namespace="research",
                    containers=[
                        api_pb2.ContainerResources(
                            name="trainer",
                            devices=[devices(resource_name="nvidia.com/gpu", device_ids=[f"{GPU_C}::3"])],
                        )
                    ],
                ),
                api_pb2.PodResources(name="web", namespace="default"),
            ]
        )


@pytest.fixture
async def kubelet(tmp_path: Path) -> AsyncIterator[tuple[Kubelet, str]]:
    socket = str(tmp_path / "kubelet.sock")
    server = grpc.aio.server()
    servicer = Kubelet()
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    try:
        yield servicer, socket
    finally:
        await server.stop(None)


async def test_maps_each_gpu_uuid_to_its_pod(kubelet: tuple[Kubelet, str]) -> None:
    servicer, socket = kubelet
    client = PodResourcesClient(socket)
    try:
        pods = await client.gpu_pods()
    finally:
        await client.close()
    assert pods == {
        GPU_A: PodRef("serving", "chat-0"),
        GPU_B: PodRef("serving", "chat-0"),
        GPU_C: PodRef("research", "train-0"),
    }
    assert servicer.calls == 1
    assert str(pods[GPU_A]) == "serving/chat-0"


async def test_no_kubelet_socket_is_a_clear_error(tmp_path: Path) -> None:
    client = PodResourcesClient(str(tmp_path / "missing.sock"), timeout=1.0)
    try:
        with pytest.raises(PodResourcesError, match="UNAVAILABLE"):
            await client.gpu_pods()
    finally:
        await client.close()
