"""Shared by every process: settings, logging, the broker link (connect, confirmed publish,
direct consume) and the runner. Imports no entry point, ingress, worker or sink."""
