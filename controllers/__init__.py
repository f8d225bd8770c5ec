"""The Ampacity operator: `kopf run -m controllers` registers every reconciler below.

One package per kind (`controllers/<kind>/`: its controller, child builders and helpers); what
every kind shares sits here (`reconciler`, `metrics`, `settings`, `tokens`).
"""

from controllers import settings
from controllers.federatedround import controller as federatedround
from controllers.powerbudget import controller as powerbudget
from controllers.servingpool import controller as servingpool
from controllers.trainingjob import controller as trainingjob

__all__ = ["federatedround", "powerbudget", "servingpool", "settings", "trainingjob"]
