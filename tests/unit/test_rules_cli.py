"""`triage-node rules check|explain` on real files (pydicom's CT and MR, the shipped config)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

from triage_node.cli.main import main

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "conf" / "node.yaml")


def _study(folder: Path, body_part: str) -> Path:
    """A two-series study: pydicom's CT (as a head CT) and MR files in one Study UID."""
    folder.mkdir()
    study_uid = pydicom.uid.generate_uid()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        path = get_testdata_file(name, download=False)
        assert isinstance(path, str)
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.BodyPartExamined = body_part
        out = io.BytesIO()
        ds.save_as(out)
        (folder / name).write_bytes(out.getvalue())
    (folder / "README.txt").write_text("not dicom")
    return folder


def test_check_accepts_the_shipped_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "check", "--config", CONFIG]) == 0
    shipped = yaml.safe_load((REPO / "conf" / "rules.yaml").read_text())["rules"]
    assert f"OK, {len(shipped)} rule(s)" in capsys.readouterr().out


def test_check_reports_errors_with_line_and_exit_1(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text((REPO / "conf" / "rules.yaml").read_text()
                   .replace("BodyPartExamined", "BodyPartExamnied"))
    assert main(["rules", "check", str(bad), "--config", CONFIG]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:" in err and "rule 'head-ct-hemorrhage'" in err
    assert "did you mean 'BodyPartExamined'" in err


def test_explain_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _study(tmp_path / "study", "HEAD")
    # CT_small is a single 5 mm slice: the detector's series selection (≥ 16 instances) says no.
    assert main(["rules", "explain", str(folder), "--config", CONFIG]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "README.txt" in captured.err
    out = captured.out
    assert "Rule head-ct-hemorrhage: MATCHED" in out
    assert "✔ Modality equals 'CT'   [seen: CT]" in out
    assert "✘ Modality equals 'CT'   [seen: MR]" in out
    assert "✔ BodyPartExamined matches" in out
    assert "Decision: rule head-ct-hemorrhage — detectors ct-head-hemorrhage, priority routine" \
        in out
    assert "NO suitable series" in out and "1 instances, need 16-any" in out


def test_explain_json_and_no_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _study(tmp_path / "study", "ABDOMEN")  # no shipped rule takes an abdomen CT
    assert main(["rules", "explain", str(folder), "--json", "--config", CONFIG]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["decision"]["rule"] is None
    assert data["rules"][0]["matched"] is False
    assert len(data["series"]) == 2
