"""Pipeline services (capture, inference, playback, monitor)."""
