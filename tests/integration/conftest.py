"""Real parts for integration tests: Debian's Orthanc and the node as a child process."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.demo.node import NodeProcess, write_node_config
from deploy.demo.orthanc import LocalOrthanc
from deploy.demo.senders import dcmtk

pytestmark = pytest.mark.integration


def _need(binary: str) -> None:
    if shutil.which(binary) is None and not Path(binary).exists():
        pytest.fail(f"{binary} is not installed: run `make install`")


def _need_dcmtk(tool: str) -> None:
    """The DCMTK tool, not pynetdicom's command of the same name (see :func:`dcmtk`)."""
    try:
        dcmtk(tool)
    except FileNotFoundError as exc:
        pytest.fail(f"{exc}")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalOrthanc]:
    _need("/usr/sbin/Orthanc")
    server = LocalOrthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node(orthanc: LocalOrthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    _need_dcmtk("storescu")
    folder = tmp_path_factory.mktemp("node")
    config = write_node_config(folder, assembly__series_quiet_seconds=1,
                               assembly__study_quiet_seconds=1,
                               delivery__retry_initial_seconds=0.5,
                               delivery__retry_max_seconds=2)
    proc = NodeProcess(folder / "data", orthanc, config=config).start()
    yield proc
    proc.stop()
