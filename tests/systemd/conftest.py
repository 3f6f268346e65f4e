"""Fixtures for the tests that run under a real systemd in a container.

One container is booted per test session (about 2 s) and shared; each test
uses its own unit names.  Everything here is skipped, with the reason, where a
container cannot be booted: not root, no systemd-nspawn, or a failed boot (the
reason then quotes nspawn's last stderr lines).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd.harness import Container, ContainerError, boot_problem

CHECKOUT = Path(__file__).resolve().parents[2]
USER = "swarm"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this directory boots systemd: mark it so ``-m 'not systemd'`` works."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.systemd)


@pytest.fixture(scope="session")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """A booted container with the host's OS; see tests/systemd/harness.py."""
    problem = boot_problem()
    if problem is not None:
        pytest.skip(problem)
    artifacts = tmp_path_factory.mktemp("artifacts")
    box = Container(CHECKOUT, artifacts=artifacts)
    try:
        box.start()
    except ContainerError as exc:
        box.stop()
        pytest.skip(f"cannot boot a systemd container here: {exc}")
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture(scope="session")
def swarm_user(container: Container) -> str:
    """The unprivileged user ``swarm`` with a lingering user manager."""
    container.add_user(USER)
    return USER


@pytest.fixture(scope="session")
def agentctl_venv(container: Container) -> str:
    """Path of ``agentctl`` in a venv with the checkout installed (for any user)."""
    return container.install_project()
