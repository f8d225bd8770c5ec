"""PowerBudget: aggregate node telemetry, run the capping policy, assign caps through NodePower."""
