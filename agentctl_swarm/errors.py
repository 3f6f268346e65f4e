"""The exceptions a person can cause, each rendered as one readable line.

The CLI prints ``str(exc)`` of any :class:`SwarmError` and exits non-zero, so a
message must never span lines or carry a traceback's worth of detail.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base of every error the swarm reports to a person as one line."""

    def __str__(self) -> str:
        text = super().__str__()
        # Collapse embedded newlines so the CLI's "one line" promise holds even
        # when a message quotes multi-line input (a YAML snippet, a stderr tail).
        return " ".join(text.split()) if "\n" in text or "\r" in text else text


class ConfigError(SwarmError):
    """The config file or a role file is missing, unreadable or invalid."""


class StateError(SwarmError):
    """A state file could not be written (disk full, I/O error, permissions)."""
