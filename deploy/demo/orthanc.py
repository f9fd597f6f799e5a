"""A throwaway Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) on loopback ports.

Used by the demo, the integration tests and the benchmarks: a generated config in a
temporary folder, HTTP authentication with a generated password, DICOMweb enabled, and
``OverwriteInstances`` on so that a re-delivered result replaces the earlier one.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deploy.demo.process import kill_process, stop_process
from deploy.demo.senders import dcmtk_env

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, *,
                  name: str = "server", timeout: float = 10.0) -> None:
    """Wait until something accepts connections on loopback ``port``; raise RuntimeError
    when ``proc`` (the process meant to listen there) exits first or ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening on "
                               f"port {port}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{name}: nothing listens on port {port} after {timeout} s")


@dataclass
class LocalOrthanc:
    workdir: Path
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    username: str = "triage"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    overwrite: bool = True
    """``OverwriteInstances``; off is Orthanc's default (a hospital's Orthanc may keep it)."""
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The running Orthanc's process id (None when stopped)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=30)

    def _write_config(self) -> Path:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "triage-node-local",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "OverwriteInstances": self.overwrite,
            "DicomCheckCalledAet": False,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpDescribeErrors": True,
            "StableAge": 2,
            "LimitFindResults": 0,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout: float = 30.0) -> LocalOrthanc:
        if not Path(ORTHANC_BIN).exists():
            raise RuntimeError(f"{ORTHANC_BIN} not found: run `make install` (Debian orthanc)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        log = (self.workdir / "orthanc.log").open("wb")
        env = dcmtk_env()
        self._proc = subprocess.Popen([ORTHANC_BIN, str(config)], stdout=log,
                                      stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self._proc.returncode}; see {self.workdir}/orthanc.log")
            try:
                if httpx.get(f"{self.url}/system", auth=self.auth, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"Orthanc did not answer within {timeout} s")
        # Answering HTTP does not mean its DICOM port is open yet: senders need both.
        try:
            wait_for_port(self.dicom_port, self._proc, name="Orthanc",
                          timeout=max(1.0, deadline - time.monotonic()))
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_process(self._proc, timeout=15)
        self._proc = None

    def kill(self) -> None:
        """Stop at once (a crash), keeping the storage folder for a restart."""
        kill_process(self._proc)
        self._proc = None

    def __enter__(self) -> LocalOrthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
