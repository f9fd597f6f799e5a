"""Run ``triage-node serve`` as a child process on free loopback ports (demo, tests, benchmarks)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from deploy.demo.orthanc import LocalOrthanc, free_port
from deploy.demo.process import kill_process, stop_process

REPO = Path(__file__).resolve().parents[2]
SETTLED = ("delivered", "not-applicable", "failed")
"""Worklist statuses after which the node will do nothing more for a study."""


def write_node_config(folder: Path, **overrides: Any) -> Path:
    """A copy of ``conf/node.yaml`` with absolute rule/detector paths and some keys replaced.

    ``overrides`` are ``section__key=value`` (e.g. ``assembly__study_quiet_seconds=2``).
    """
    config = yaml.safe_load((REPO / "conf" / "node.yaml").read_text())
    config["rules_file"] = str(REPO / "conf" / config["rules_file"])
    config["detectors_dir"] = str(REPO / "conf" / config["detectors_dir"])
    for name, value in overrides.items():
        section, _, key = name.partition("__")
        if key:
            config.setdefault(section, {})[key] = value
        else:
            config[section] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class NodeProcess:
    data_dir: Path
    orthanc: LocalOrthanc
    config: Path = REPO / "conf" / "node.yaml"
    dicom_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, timeout: float = 60.0) -> NodeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_path or self.data_dir / "node.log"
        env = {
            **os.environ,
            "TRIAGE_NODE_API_TOKEN": self.token,
            "TRIAGE_NODE_ORTHANC_USERNAME": self.orthanc.username,
            "TRIAGE_NODE_ORTHANC_PASSWORD": self.orthanc.password,
            **self.extra_env,
        }
        cmd = [sys.executable, "-m", "triage_node.cli.main", "serve", "--config", str(self.config),
               "--data-dir", str(self.data_dir), "--dicom-port", str(self.dicom_port),
               "--api-port", str(self.api_port), "--orthanc-url", self.orthanc.url]
        log = self.log_path.open("ab")
        # Its own process group, so that kill() takes down the receiving processes with it.
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"triage-node exited with {self._proc.returncode}:\n"
                                   + self.log_path.read_text()[-3000:])
            try:
                if httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"triage-node did not answer within {timeout} s")

    def worklist(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.api_url}/api/worklist", params={"limit": 10_000},
                      headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        r.raise_for_status()
        items: list[dict[str, Any]] = r.json()
        return items

    def wait_for(self, predicate: Any, timeout: float = 180.0, interval: float = 0.2) -> Any:
        """Poll the worklist until ``predicate(items)`` is truthy; return that value."""
        deadline = time.monotonic() + timeout
        items: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError("triage-node exited:\n" + self.log_text()[-3000:])
            items = self.worklist()
            value = predicate(items)
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"worklist condition not met in {timeout} s; items: {items}")

    def wait_for_study(self, study_uid: str,
                       statuses: tuple[str, ...] = SETTLED, timeout: float = 240.0) -> Any:
        """Wait until the study's worklist item has one of ``statuses``; return the item."""
        def check(items: list[dict[str, Any]]) -> dict[str, Any] | None:
            item = next((i for i in items if i["study_instance_uid"] == study_uid), None)
            return item if item is not None and item["status"] in statuses else None
        return self.wait_for(check, timeout=timeout)

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self._proc, timeout=30)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the node and its receiving processes at once, as a crash would."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
        kill_process(self._proc)
        self._proc = None
