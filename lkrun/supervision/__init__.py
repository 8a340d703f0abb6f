"""Job supervision: each job from offer to end, in processes forked from a per-agent fork server."""
