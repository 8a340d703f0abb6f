"""What the daemon serves: the control API (Unix socket), health endpoints and metrics."""
