"""Studies of the serving policies on public traces (cold starts, re-planning replays)."""
