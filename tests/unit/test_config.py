from __future__ import annotations

from pathlib import Path

import pytest

from triage_node.cli.main import main
from triage_node.config.loader import load_detector_configs, load_node_config
from triage_node.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_is_valid() -> None:
    cfg = load_node_config(REPO / "conf" / "node.yaml")
    assert cfg.dicom.ae_title == "TRIAGE"
    assert cfg.dicom.port == 11112
    assert (cfg.api.host, cfg.api.port) == ("127.0.0.1", 8642)
    assert cfg.rules_file == REPO / "conf" / "rules.yaml"
    detectors = load_detector_configs(cfg.detectors_dir)
    assert "ct-head-hemorrhage" in detectors
    assert detectors["ct-head-hemorrhage"].manifest.is_absolute()


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("dicom:\n  ae_title: TRIAGE\n  portt: 104\n")
    with pytest.raises(ConfigError) as err:
        load_node_config(path)
    assert f"{path}: dicom.portt: unknown key" in str(err.value)


def test_bad_value_names_key_and_expectation(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("dicom:\n  ae_title: 'THIS_AE_TITLE_IS_TOO_LONG'\n  port: 99999\n")
    with pytest.raises(ConfigError) as err:
        load_node_config(path)
    text = str(err.value)
    assert "dicom.ae_title" in text and "1-16" in text
    assert "dicom.port" in text and "65535" in text


def test_broken_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("dicom:\n  port: [1,\n")
    with pytest.raises(ConfigError, match=r"node.yaml: line \d+ is not valid YAML"):
        load_node_config(path)


def test_detector_name_must_match_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: b\nmanifest: m.json\n")
    with pytest.raises(ConfigError, match="must match the file name"):
        load_detector_configs(tmp_path)


def test_cli_reports_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("bogus: 1\n")
    assert main(["worklist", "--config", str(path)]) == 2
    assert "bogus: unknown key" in capsys.readouterr().err
