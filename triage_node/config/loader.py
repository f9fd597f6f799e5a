"""Load YAML configuration into the pydantic models, with errors that name file and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from triage_node.config.models import DetectorConfig, NodeConfig
from triage_node.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML: {exc}") from exc


def format_validation_error(path: Path, exc: ValidationError) -> str:
    """One line per problem: ``file: key.path: what was expected``."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{path}: {key}: {msg}")
    return "\n".join(lines)


def validate_file(path: Path, model: type[M]) -> M:
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from exc


def load_node_config(path: Path) -> NodeConfig:
    """Load ``node.yaml``; relative paths inside it become relative to its folder."""
    cfg = validate_file(path, NodeConfig)
    base = path.parent
    if not cfg.rules_file.is_absolute():
        cfg.rules_file = base / cfg.rules_file
    if not cfg.detectors_dir.is_absolute():
        cfg.detectors_dir = base / cfg.detectors_dir
    return cfg


def load_detector_configs(folder: Path) -> dict[str, DetectorConfig]:
    """Load every ``*.yaml`` in ``folder``; names must be unique and match the file name."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: detectors folder does not exist")
    configs: dict[str, DetectorConfig] = {}
    for path in sorted(folder.glob("*.yaml")):
        cfg = validate_file(path, DetectorConfig)
        if cfg.name != path.stem:
            raise ConfigError(f"{path}: name: {cfg.name!r} must match the file name {path.stem!r}")
        if not cfg.manifest.is_absolute():
            cfg.manifest = (path.parent / cfg.manifest).resolve()
        configs[cfg.name] = cfg
    return configs
