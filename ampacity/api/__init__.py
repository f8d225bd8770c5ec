"""Ampacity's API (group ampacity.dev, version v1alpha1): the single source of truth for the CRDs."""

from ampacity.api.federatedround import FEDERATED_ROUND
from ampacity.api.nodepower import NODE_POWER
from ampacity.api.powerbudget import POWER_BUDGET
from ampacity.api.resource import Resource
from ampacity.api.servingpool import SERVING_POOL
from ampacity.api.trainingjob import TRAINING_JOB

RESOURCES: tuple[Resource, ...] = (
    SERVING_POOL,
    TRAINING_JOB,
    FEDERATED_ROUND,
    POWER_BUDGET,
    NODE_POWER,
)

__all__ = [
    "FEDERATED_ROUND",
    "NODE_POWER",
    "POWER_BUDGET",
    "RESOURCES",
    "SERVING_POOL",
    "TRAINING_JOB",
    "Resource",
]
