"""Studies of the power policy: how many servers fit under one breaker."""
