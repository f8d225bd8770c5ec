"""Fake GPU servers for kwok: Node objects that look like real GPU nodes to the scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ampacity.api.gpu import (
    GPU_COUNT_LABEL,
    GPU_MEMORY_LABEL,
    GPU_PRESENT_LABEL,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    GPU_TYPE_LABEL,
    RACK_LABEL,
    ROW_LABEL,
)
from ampacity.api.gpu_products import CATALOGUE

KWOK_ANNOTATION = "kwok.x-k8s.io/node"

#: Short GPU type -> (GPU Feature Discovery product label, GPU memory in MiB), from the one catalogue.
GPU_PRODUCTS = {p.short_name: (p.product, p.memory_mib) for p in CATALOGUE if p.product.startswith("NVIDIA-")}


@dataclass(frozen=True)
class GpuNodeShape:
    """What each fake server looks like."""

    gpu_type: str = "h100"
    gpus: int = 8
    cpus: int = 128
    memory_gib: int = 1024
    nodes_per_rack: int = 4
    row: str = "row-a"


def gpu_node(name: str, index: int, shape: GpuNodeShape) -> dict[str, Any]:
    """A Node manifest for one kwok-managed GPU server (status included: kwok keeps it)."""
    product, memory_mib = GPU_PRODUCTS[shape.gpu_type]
    capacity = {
        "cpu": str(shape.cpus),
        "memory": f"{shape.memory_gib}Gi",
        "pods": "110",
        GPU_RESOURCE: str(shape.gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                GPU_PRESENT_LABEL: "true",
                GPU_PRODUCT_LABEL: product,
                GPU_COUNT_LABEL: str(shape.gpus),
                GPU_MEMORY_LABEL: str(memory_mib),
                GPU_TYPE_LABEL: shape.gpu_type,
                ROW_LABEL: shape.row,
                RACK_LABEL: f"rack-{index // shape.nodes_per_rack}",
            },
        },
        # The providerID keeps cloud-node controllers from treating the node as orphaned.
        "spec": {"providerID": f"kwok://{name}"},
        "status": {
            "capacity": capacity,
            "allocatable": dict(capacity),
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "v1.37.2",
                "kubeProxyVersion": "v1.37.2",
                "bootID": "",
                "containerRuntimeVersion": "",
                "kernelVersion": "",
                "machineID": "",
                "osImage": "",
                "systemUUID": "",
            },
            "phase": "Running",
        },
    }
