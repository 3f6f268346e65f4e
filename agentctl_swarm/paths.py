"""Every path the swarm keeps under ``~/.agentctl/``, in one place.

The home directory is resolved from ``$HOME`` (``Path.home()``), so a test or a
second user gets a separate swarm by setting ``HOME``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SwarmPaths:
    """The swarm's own files (not the agents' workspaces)."""

    root: Path

    @classmethod
    def for_home(cls, home: Path | None = None) -> "SwarmPaths":
        return cls((home or Path.home()) / ".agentctl")

    @property
    def pidfile(self) -> Path:
        return self.root / "swarm.pid"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "control.sock"

    @property
    def control_token(self) -> Path:
        return self.run_dir / "control.token"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def roles_dir(self) -> Path:
        return self.root / "roles"

    def state_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.json"

    def ensure(self) -> None:
        """Create the private directories (0700) the supervisor writes into."""
        for path in (self.root, self.run_dir, self.state_dir, self.log_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(path, 0o700)
