"""Queueing: walk-in tickets, counters, the call-next policy (pure), ETA (pure), live feed."""
