"""Reading back what the node stored in a test's Orthanc."""

from __future__ import annotations

import subprocess
from pathlib import Path

from deploy.demo.orthanc import LocalOrthanc


def study_instances(orthanc: LocalOrthanc, study_uid: str) -> dict[str, list[bytes]]:
    """Every instance Orthanc holds for the study, as Part 10 bytes, by series modality
    (empty when Orthanc does not know the study)."""
    found: dict[str, list[bytes]] = {}
    with orthanc.client() as client:
        ids = client.post("/tools/lookup", content=study_uid.encode()).json()
        study = next((i["ID"] for i in ids if i["Type"] == "Study"), None)
        if study is None:
            return found
        for series in client.get(f"/studies/{study}/series").json():
            modality = series["MainDicomTags"].get("Modality")
            for instance in series["Instances"]:
                data = client.get(f"/instances/{instance}/file").content
                found.setdefault(modality, []).append(data)
    return found


def dciodvfy_errors(data: bytes, folder: Path, name: str) -> list[str]:
    """The error lines of ``dciodvfy -new`` on ``data`` (written to ``folder/name``)."""
    path = folder / name
    path.write_bytes(data)
    out = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
