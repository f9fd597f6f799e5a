"""The ``triage-node`` command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from triage_node.config.loader import load_node_config
from triage_node.config.models import NodeConfig
from triage_node.errors import TriageError

if TYPE_CHECKING:
    from triage_node.routing.explain import DetectorSeriesSpec

DEFAULT_CONFIG = Path("conf/node.yaml")


def _load_config(args: argparse.Namespace) -> NodeConfig:
    config = load_node_config(args.config) if args.config.exists() or args.config_given \
        else NodeConfig()
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    for flag, section, key in (("dicom_port", "dicom", "port"), ("api_port", "api", "port"),
                               ("orthanc_url", "orthanc", "url")):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(getattr(config, section), key, value)
    return NodeConfig.model_validate(config.model_dump())


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from triage_node.api.app import create_app
    from triage_node.logging import configure_logging
    from triage_node.node import Node

    config = _load_config(args)
    configure_logging(config.logging.level)
    node = Node(config)
    app = create_app(node)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.api.host, port=config.api.port, log_config=None, access_log=False))
    # SIGHUP re-reads the rules (an invalid file is logged and the old rules stay).
    signal.signal(signal.SIGHUP, lambda *_: node.rules.reload())
    node.start()
    try:
        server.run()  # handles SIGINT/SIGTERM and returns
    finally:
        node.stop()
    return 0


def _fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%H:%M:%S")


def _cmd_worklist(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from triage_node.state.db import Database
    from triage_node.worklist.store import WorklistStore

    config = _load_config(args)
    db_path = config.data_dir / "state.sqlite3"
    if not db_path.exists():
        print(f"triage-node: no state database at {db_path} (has the node run?)",
              file=sys.stderr)
        return 2
    items = WorklistStore(Database(db_path)).items(limit=args.limit)
    if args.json:
        print(json.dumps([i.to_dict() for i in items], indent=2))
        return 0
    colours = {"critical": "bold red", "urgent": "dark_orange", "routine": "yellow",
               "negative": "green", "failed": "magenta", "not-applicable": "dim"}
    table = Table(title=f"triage-node worklist ({len(items)} studies)")
    for col in ("urgency", "study", "status", "findings", "arrived", "processed", "delivered",
                "note"):
        table.add_column(col)
    for item in items:
        findings = ", ".join(
            f"{f['label']} {f['volume_ml']:.1f} mL p={f['score']:.2f}"
            if f.get("volume_ml") is not None else f"{f['label']} p={f['score']:.2f}"
            for f in item.findings) or "-"
        table.add_row(
            f"[{colours.get(str(item.urgency), '')}]{item.urgency}[/]",
            item.study_instance_uid if args.show_uids else item.study_key,
            item.status, findings, _fmt_time(item.arrived_at), _fmt_time(item.processed_at),
            _fmt_time(item.delivered_at), item.reason or "")
    Console(width=args.width).print(table)
    return 0


def _detector_specs(config: NodeConfig) -> dict[str, DetectorSeriesSpec]:
    from triage_node.config.loader import load_detector_configs
    from triage_node.detectors.manifest import load_manifest
    from triage_node.routing.explain import DetectorSeriesSpec

    return {name: DetectorSeriesSpec(cfg.series,
                                     load_manifest(cfg.manifest, verify=False).modalities)
            for name, cfg in load_detector_configs(config.detectors_dir).items()
            if cfg.enabled}


def _cmd_rules_check(args: argparse.Namespace) -> int:
    from triage_node.errors import RoutingError
    from triage_node.routing.rules import Router, load_rules

    config = _load_config(args)
    path = args.file or config.rules_file
    specs = _detector_specs(config)
    try:
        ruleset = load_rules(path)
        Router(ruleset, known_detectors=set(specs), known_destinations=set(config.destinations))
    except RoutingError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    fallback = "; fallback defined" if ruleset.fallback is not None else ""
    print(f"{path}: OK, {len(ruleset.rules)} rule(s){fallback}")
    return 0


def _cmd_rules_explain(args: argparse.Namespace) -> int:
    from triage_node.receive.dicomweb import DicomWebSource
    from triage_node.routing.context import context_from_headers
    from triage_node.routing.explain import (
        explain,
        headers_from_folder,
        headers_from_metadata,
        render,
    )
    from triage_node.routing.rules import Router, load_rules
    from triage_node.spool.index import Source
    from triage_node.state.keys import KeyMaker

    config = _load_config(args)
    specs = _detector_specs(config)
    router = Router(load_rules(args.file or config.rules_file), known_detectors=set(specs),
                    known_destinations=set(config.destinations))
    source = Source(args.calling_ae or "", args.called_ae or config.dicom.ae_title,
                    args.host or "")
    folder = Path(args.study)
    if folder.exists():
        headers, skipped = headers_from_folder(folder)
        for line in skipped:
            print(f"skipped {line}", file=sys.stderr)
    else:
        web = DicomWebSource.for_orthanc(config.orthanc)
        try:
            headers = headers_from_metadata(web.metadata(web.resolve_study_uid(args.study)))
        finally:
            web.close()
    # Keys only label series in the output; a throwaway secret keeps them opaque.
    ctx = context_from_headers(headers, source, KeyMaker(os.urandom(16)))
    result = explain(router, ctx, specs)
    print(json.dumps(result.to_dict(), indent=2) if args.json else render(result))
    return 0


def _api_call(args: argparse.Namespace, method: str, path: str,
              body: dict[str, object] | None = None) -> int:
    import httpx

    config = _load_config(args)
    url = (args.api_url or f"http://{config.api.host}:{config.api.port}").rstrip("/") + path
    token = os.environ.get(config.api.token_env, "")
    if not token:
        print(f"triage-node: set {config.api.token_env} to call the node's API", file=sys.stderr)
        return 2
    try:
        response = httpx.request(method, url, json=body, timeout=600,
                                 headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        print(f"triage-node: cannot reach the node at {url}: {type(exc).__name__}",
              file=sys.stderr)
        return 2
    try:
        payload = response.json()
    except ValueError:
        payload = response.text
    print(json.dumps(payload, indent=2) if not isinstance(payload, str) else payload)
    return 0 if response.status_code < 400 else 1


def _cmd_rules_reload(args: argparse.Namespace) -> int:
    return _api_call(args, "POST", "/api/rules/reload")


def _cmd_process(args: argparse.Namespace) -> int:
    return _api_call(args, "POST", "/api/studies/process", {"orthanc_study": args.orthanc_study})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triage-node", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=None,
                       help=f"node config YAML (default: {DEFAULT_CONFIG} if it exists)")
        p.add_argument("--data-dir", type=Path, default=None, help="override data_dir")

    serve = sub.add_parser("serve", help="run the node: DICOM receiver, workers and API")
    add_common(serve)
    serve.add_argument("--dicom-port", type=int, default=None)
    serve.add_argument("--api-port", type=int, default=None)
    serve.add_argument("--orthanc-url", default=None)
    serve.set_defaults(func=_cmd_serve)

    wl = sub.add_parser("worklist", help="print the worklist, most urgent first")
    add_common(wl)
    wl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    wl.add_argument("--limit", type=int, default=200)
    wl.add_argument("--show-uids", action="store_true",
                    help="show Study Instance UIDs instead of opaque study keys")
    wl.add_argument("--width", type=int, default=None, help="table width in characters")
    wl.set_defaults(func=_cmd_worklist)

    rules = sub.add_parser("rules", help="check, explain and reload routing rules")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate a rules file (default: the config's)")
    add_common(check)
    check.add_argument("file", nargs="?", type=Path, default=None)
    check.set_defaults(func=_cmd_rules_check)
    expl = rules_sub.add_parser(
        "explain", help="dry run: how a study would be routed, condition by condition")
    add_common(expl)
    expl.add_argument("study", help="a folder of DICOM files, or an Orthanc study "
                                    "(Orthanc id or Study Instance UID, fetched by DICOMweb)")
    expl.add_argument("--file", type=Path, default=None, help="rules file to try instead")
    expl.add_argument("--calling-ae", default=None, help="pretend the study came from this AE")
    expl.add_argument("--called-ae", default=None)
    expl.add_argument("--host", default=None, help="pretend the study came from this host")
    expl.add_argument("--json", action="store_true")
    expl.set_defaults(func=_cmd_rules_explain)
    reload_ = rules_sub.add_parser("reload", help="ask the running node to re-read its rules")
    add_common(reload_)
    reload_.add_argument("--api-url", default=None)
    reload_.set_defaults(func=_cmd_rules_reload)

    proc = sub.add_parser("process", help="run a study from Orthanc through the node again")
    add_common(proc)
    proc.add_argument("--orthanc-study", required=True,
                      help="Orthanc study id or Study Instance UID")
    proc.add_argument("--api-url", default=None, help="the node's API (default: from config)")
    proc.set_defaults(func=_cmd_process)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.config_given = args.config is not None
    if args.config is None:
        args.config = DEFAULT_CONFIG
    try:
        code: int = args.func(args)
    except TriageError as exc:
        print(f"triage-node: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
