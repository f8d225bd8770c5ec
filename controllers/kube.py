"""The operator's Kubernetes I/O. The client lives in `ampacity.kube` (shared with the node
agent, which must not import the operator); this module re-exports it, so edit it there."""

from ampacity.kube import FIELD_MANAGER, KINDS, Kind, Kube, KubeError, Object

__all__ = ["FIELD_MANAGER", "KINDS", "Kind", "Kube", "KubeError", "Object"]
