"""The Ampacity operator: `kopf run -m controllers` registers every reconciler below."""

from controllers import federatedround, powerbudget, servingpool, settings, trainingjob

__all__ = ["federatedround", "powerbudget", "servingpool", "settings", "trainingjob"]
