"""Prometheus exporter for Linux connection tracking and socket resource exhaustion."""

__version__ = "0.1.0"
