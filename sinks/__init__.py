"""Notification sinks: each consumes its own queue bound to `{ns}.events` and delivers."""
