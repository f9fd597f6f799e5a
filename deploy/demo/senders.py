"""Send studies the way a PACS does: DCMTK ``storescu`` (with Nagle off, see TCP_NODELAY)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def storescu(folder: Path, port: int, *, called_aet: str = "TRIAGE",
             calling_aet: str = "STORESCU", host: str = "127.0.0.1",
             extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Send every file in ``folder`` (recursively) over one association; raises on failure."""
    cmd = ["storescu", "-aet", calling_aet, "-aec", called_aet, "+sd", "+r",
           *(extra or []), host, str(port), str(folder)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"storescu exited {result.returncode}: {result.stderr[-2000:]}")
    return result
