"""Runtime: the per-call session (limit, executors, journal, trace), the scheduler that
runs a plan, and the engine's own event-loop thread."""
