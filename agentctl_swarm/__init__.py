"""agentctl-swarm: run fleets of AI coding agents on one Linux machine."""

__version__ = "0.1.0"
