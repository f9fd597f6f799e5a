"""Send studies the way a PACS does: DCMTK ``storescu`` (with Nagle off: :func:`dcmtk_env`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def dcmtk(tool: str) -> str:
    """The path of a DCMTK tool (``storescu``, ``storescp``, …) on ``PATH``, skipping this
    Python environment's own ``bin`` folder: pynetdicom installs commands of the same names
    there, with other options, and an activated environment puts them first."""
    ours = (Path(sys.prefix) / "bin").resolve()
    folders = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep)
               if d and Path(d).resolve() != ours]
    found = shutil.which(tool, path=os.pathsep.join(folders))
    if found is None:
        raise FileNotFoundError(f"{tool}: not found on PATH; install DCMTK "
                                "(apt-get install dcmtk, or `make install`)")
    return found


def dcmtk_env() -> dict[str, str]:
    """The environment for DCMTK's tools and Orthanc (built on DCMTK's network code):
    ``TCP_NODELAY=1``. Debian's DCMTK leaves Nagle's algorithm on otherwise, and each small
    PDU that follows a large one waits about 40 ms for the peer's delayed acknowledgement."""
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(folder: Path, port: int, *, called_aet: str = "TRIAGE",
             calling_aet: str = "STORESCU", host: str = "127.0.0.1",
             extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Send every file in ``folder`` (recursively) over one association; raises on failure."""
    cmd = [dcmtk("storescu"), "-aet", calling_aet, "-aec", called_aet, "+sd", "+r",
           *(extra or []), host, str(port), str(folder)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"storescu exited {result.returncode}: {result.stderr[-2000:]}")
    return result
