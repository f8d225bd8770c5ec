"""GPU names on the wire: the extended resource, the node labels, and a pod's GPU count.

NVIDIA's device plugin advertises `nvidia.com/gpu`; GPU Feature Discovery labels nodes with
`nvidia.com/gpu.product` (e.g. `NVIDIA-H100-80GB-HBM3`), `.count` and `.memory` (MiB). Ampacity's
own short type (`ampacity.dev/gpu-type`, e.g. `h100`) and the row/rack labels the power budgets
select are set by the cluster's admin (or the local harness's fake nodes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
GPU_TYPE_LABEL = "ampacity.dev/gpu-type"
ROW_LABEL = "ampacity.dev/row"
RACK_LABEL = "ampacity.dev/rack"


def pod_gpus(pod: Mapping[str, Any]) -> int:
    """GPUs a pod holds: the sum of its containers' `nvidia.com/gpu`.

    For an extended resource the API server requires requests == limits and defaults a missing
    request to the limit, so either one is the count; limits are read first because a request
    alone is not allowed for extended resources and cannot appear on an admitted pod.
    """
    total = 0
    for container in pod.get("spec", {}).get("containers", []) or []:
        resources = container.get("resources", {}) or {}
        value = (resources.get("limits") or {}).get(GPU_RESOURCE) or (resources.get("requests") or {}).get(
            GPU_RESOURCE
        )
        total += int(value or 0)
    return total
