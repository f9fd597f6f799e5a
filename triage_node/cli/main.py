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
    from triage_node.spool.quarantine import Quarantine
    from triage_node.state.db import Database

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
        app, host=config.api.host, port=config.api.port, log_config=None, access_log=False,
        # open /api/events streams never end by themselves: bound the wait at shutdown
        timeout_graceful_shutdown=5))
    # SIGHUP re-reads the rules (an invalid file is logged and the old rules stay).
    signal.signal(signal.SIGHUP, lambda *_: node.reload_rules(by="system:sighup"))
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
    from triage_node.worklist.store import WorklistStore, summarize

    config = _load_config(args)
    db_path = config.data_dir / "state.sqlite3"
    if not db_path.exists():
        print(f"triage-node: no state database at {db_path} (has the node run?)",
              file=sys.stderr)
        return 2
    store = WorklistStore(Database(db_path), order=config.worklist.order)
    try:
        page = store.page(tiers=args.tier or [], statuses=args.status or [], limit=args.limit)
    except ValueError as exc:
        print(f"triage-node: {exc}", file=sys.stderr)
        return 2
    items = page.items
    if args.json:
        print(json.dumps([i.to_dict() for i in items], indent=2))
        return 0
    colours = {"critical": "bold red", "urgent": "dark_orange", "routine": "yellow",
               "negative": "green", "failed": "magenta", "not-applicable": "dim"}
    table = Table(title=f"triage-node worklist ({len(items)} of {page.total} studies)")
    for col in ("tier", "study", "status", "score", "findings", "arrived", "delivered",
                "claimed", "read", "note"):
        table.add_column(col)
    for item in items:
        tier = item.tier or "pending"
        table.add_row(
            f"[{colours.get(tier, 'italic')}]{tier}[/]",
            item.study_instance_uid if args.show_uids else item.study_key,
            item.status, "-" if item.score is None else f"{item.score:.2f}",
            summarize(item.findings) or "-", _fmt_time(item.arrived_at),
            _fmt_time(item.delivered_at), item.claimed_by or "-",
            f"{item.read_by} {_fmt_time(item.read_at)}" if item.read_by else "-",
            item.reason or "")
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


def _outbox_db(args: argparse.Namespace) -> tuple[NodeConfig, Database] | None:
    from triage_node.state.db import Database

    config = _load_config(args)
    db_path = config.data_dir / "state.sqlite3"
    if not db_path.exists():
        print(f"triage-node: no state database at {db_path} (has the node run?)",
              file=sys.stderr)
        return None
    return config, Database(db_path)


def _cmd_notifications_list(args: argparse.Namespace) -> int:
    from triage_node.notify.queue import list_notifications

    opened = _outbox_db(args)
    if opened is None:
        return 2
    _, db = opened
    try:
        records = list_notifications(db, status=args.status, limit=args.limit)
    finally:
        db.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return 0
    for r in records:
        when = _fmt_time(r.sent_at if r.status == "sent" else r.next_attempt_at)
        print(f"{r.id:5}  {r.study_key}  {r.channel:12} {r.tier:9} {r.status:8} "
              f"tries {r.attempts:2}  {when}  {r.last_error or ''}")
    print(f"{len(records)} notification(s)")
    return 0


def _cmd_notifications_retry(args: argparse.Namespace) -> int:
    from triage_node.audit import AuditLog, cli_user
    from triage_node.notify.queue import retry_dead

    if not (args.ids or args.all_dead):
        print("triage-node: notifications retry needs --id N... or --all-dead", file=sys.stderr)
        return 2
    opened = _outbox_db(args)
    if opened is None:
        return 2
    _, db = opened
    try:
        revived = retry_dead(db, ids=args.ids or ())
        if revived:
            AuditLog(db).record(user=cli_user(), role="admin", action="notifications.retry",
                                count=len(revived))
    finally:
        db.close()
    print(f"{len(revived)} dead notification(s) queued again"
          + (f": {', '.join(map(str, revived))}" if revived else ""))
    missing = sorted(set(args.ids or ()) - set(revived))
    for entry_id in missing:
        print(f"triage-node: notification {entry_id} not retried: not dead or no such id",
              file=sys.stderr)
    return 1 if missing else 0


def _cmd_outbox_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from triage_node.deliver.outbox import list_entries

    opened = _outbox_db(args)
    if opened is None:
        return 2
    _, db = opened
    try:
        entries = list_entries(db, status=args.status, destination=args.destination,
                               limit=args.limit)
    finally:
        db.close()
    if args.json:
        print(json.dumps([e.to_dict(show_uids=args.show_uids) for e in entries], indent=2))
        return 0
    what = f"{args.status} " if args.status else ""
    table = Table(title=f"triage-node outbox ({len(entries)} {what}entries)")
    columns = ["id", "study", "destination", "kind", "status", "attempts", "created",
               "next / dead at", "delivered", "last error"]
    if args.show_uids:
        columns.insert(2, "SOP instance")
    for col in columns:
        table.add_column(col)
    colours = {"pending": "yellow", "delivered": "green", "dead": "bold red"}
    for e in entries:
        row = [str(e.id), e.study_uid if args.show_uids else (e.study_key or "-"),
               e.destination, e.kind if e.action == "store" else f"{e.kind} (retract)",
               f"[{colours.get(e.status, '')}]{e.status}[/]",
               str(e.attempts), _fmt_time(e.created_at),
               _fmt_time(e.next_attempt_at) if e.status != "delivered" else "-",
               _fmt_time(e.delivered_at), e.last_error or ""]
        if args.show_uids:
            row.insert(2, e.sop_instance_uid)
        table.add_row(*row)
    Console(width=args.width).print(table)
    return 0


def _cmd_outbox_retry(args: argparse.Namespace) -> int:
    from triage_node.audit import AuditLog, cli_user
    from triage_node.deliver.outbox import list_entries, retry_dead

    if not (args.ids or args.destination or args.all_dead):
        print("triage-node: outbox retry needs --id N..., --destination NAME or --all-dead",
              file=sys.stderr)
        return 2
    opened = _outbox_db(args)
    if opened is None:
        return 2
    config, db = opened
    try:
        if args.destination is not None and args.destination not in config.destinations:
            print(f"triage-node: destination {args.destination!r} is not in the config "
                  f"(configured: {', '.join(sorted(config.destinations))}); retried entries "
                  "would fail again", file=sys.stderr)
            return 2
        revived = retry_dead(db, ids=args.ids or (), destination=args.destination)
        if revived:
            AuditLog(db).record(user=cli_user(), role="admin", action="outbox.retry",
                                count=len(revived), destination=args.destination)
        code = 0
        if args.ids:
            known = {e.id: e.status for e in list_entries(db, limit=1_000_000)}
            for entry_id in sorted(set(args.ids) - set(revived)):
                state = known.get(entry_id)
                reason = "no such entry" if state is None else f"it is {state}, not dead"
                print(f"triage-node: entry {entry_id} not retried: {reason}", file=sys.stderr)
                code = 1
    finally:
        db.close()
    print(f"{len(revived)} dead entr{'y' if len(revived) == 1 else 'ies'} queued for delivery"
          + (f": {', '.join(map(str, revived))}" if revived else ""))
    return code


def _quarantine(args: argparse.Namespace) -> tuple[NodeConfig, Quarantine]:
    from triage_node.spool.quarantine import Quarantine

    config = _load_config(args)
    return config, Quarantine(config.data_dir / "spool")


def _cmd_quarantine_list(args: argparse.Namespace) -> int:
    _, quarantine = _quarantine(args)
    entries = [e.to_dict() for e in quarantine.entries()]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print("quarantine is empty")
        return 0
    print(f"{'id':33}  {'received (UTC)':20}  {'size':>9}  {'calling AE':16}  reason")
    for e in entries:
        print(f"{e['id']:33}  {e['received_at'] or '-':20}  {e['size']:>9}  "
              f"{e['calling_ae'] or '-':16}  {e['reason']}")
    return 0


def _cmd_quarantine_show(args: argparse.Namespace) -> int:
    _, quarantine = _quarantine(args)
    summary = quarantine.summary(quarantine.get(args.id), show_phi=args.show_phi)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    for key in ("id", "received_at", "size", "calling_ae", "reason", "retries"):
        print(f"{key + ':':14}{summary[key]}")
    for key, value in summary["record"].items():
        if key not in ("reason", "calling_ae", "retries"):
            print(f"{key + ':':14}{value}")
    print("header:")
    for key, value in summary["header"].items():
        print(f"  {key}: {value}")
    if not args.show_phi:
        print("(patient data, dates and UIDs hidden; --show-phi shows them)")
    return 0


def _cmd_quarantine_retry(args: argparse.Namespace) -> int:
    from triage_node.audit import AuditLog, cli_user
    from triage_node.logging import configure_logging
    from triage_node.receive.ingest import Ingestor
    from triage_node.spool.index import InstanceIndex
    from triage_node.spool.store import Spool
    from triage_node.state.db import Database
    from triage_node.state.keys import KeyMaker

    config, quarantine = _quarantine(args)
    configure_logging(config.logging.level)  # JSON on stderr, PHI-free; stdout is the report
    if args.all == bool(args.ids):
        print("triage-node: give quarantine ids or --all", file=sys.stderr)
        return 2
    entries = quarantine.entries() if args.all else [quarantine.get(i) for i in args.ids]
    data_dir = config.data_dir
    db = Database(data_dir / "state.sqlite3")
    try:
        ingestor = Ingestor(Spool(data_dir / "spool"),
                            InstanceIndex(db, KeyMaker.for_data_dir(data_dir)),
                            min_free_bytes=config.dicom.min_free_disk_mb * 1024 * 1024,
                            limits=config.limits)
        results = quarantine.retry(entries, ingestor.ingest, config.limits)
        AuditLog(db).record(user=cli_user(), role="admin", action="quarantine.retry",
                            count=len(results), instances=sum(r.released for r in results))
    finally:
        db.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            detail = f"study {r.study_key}" if r.released else r.reason
            print(f"{r.id}  {r.outcome}  {detail}")
        print(f"{sum(r.released for r in results)} of {len(results)} left the quarantine")
    return 0 if all(r.released for r in results) else 1


def _cmd_quarantine_delete(args: argparse.Namespace) -> int:
    _, quarantine = _quarantine(args)
    for entry in [quarantine.get(i) for i in args.ids]:
        quarantine.remove(entry)
        print(f"deleted {entry.id}")
    return 0


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
    wl.add_argument("--tier", action="append", metavar="TIER",
                    help="only this tier (repeatable): critical, urgent, routine, negative, "
                         "failed, not-applicable")
    wl.add_argument("--status", action="append", metavar="STATUS",
                    help="only this status (repeatable): pending, receiving, queued, "
                         "processing, processed, delivered, not-applicable, failed")
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

    quar = sub.add_parser("quarantine", help="list, show, retry or delete quarantined instances")
    quar_sub = quar.add_subparsers(dest="quarantine_command", required=True)
    q_list = quar_sub.add_parser("list", help="id, received time, size, calling AE, reason")
    add_common(q_list)
    q_list.add_argument("--json", action="store_true")
    q_list.set_defaults(func=_cmd_quarantine_list)
    q_show = quar_sub.add_parser("show", help="reason and header summary of one entry")
    add_common(q_show)
    q_show.add_argument("id")
    q_show.add_argument("--show-phi", action="store_true",
                        help="also print patient name/ID, accession number, dates and UIDs")
    q_show.add_argument("--json", action="store_true")
    q_show.set_defaults(func=_cmd_quarantine_show)
    q_retry = quar_sub.add_parser(
        "retry", help="re-ingest entries: usable ones go to the spool and are processed")
    add_common(q_retry)
    q_retry.add_argument("ids", nargs="*", metavar="ID")
    q_retry.add_argument("--all", action="store_true", help="retry every entry")
    q_retry.add_argument("--json", action="store_true")
    q_retry.set_defaults(func=_cmd_quarantine_retry)
    q_delete = quar_sub.add_parser("delete", help="delete entries (bytes and reason file)")
    add_common(q_delete)
    q_delete.add_argument("ids", nargs="+", metavar="ID")
    q_delete.set_defaults(func=_cmd_quarantine_delete)

    outbox = sub.add_parser("outbox", help="results waiting for delivery, delivered, or dead")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True)
    ob_list = outbox_sub.add_parser("list", help="list outbox entries, newest first")
    add_common(ob_list)
    ob_list.add_argument("--status", choices=("pending", "delivered", "dead"), default=None)
    ob_list.add_argument("--destination", default=None, help="only this destination")
    ob_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ob_list.add_argument("--limit", type=int, default=200)
    ob_list.add_argument("--show-uids", action="store_true",
                         help="show Study/SOP Instance UIDs instead of opaque study keys")
    ob_list.add_argument("--width", type=int, default=None, help="table width in characters")
    ob_list.set_defaults(func=_cmd_outbox_list)
    ob_retry = outbox_sub.add_parser(
        "retry", help="make dead entries pending again (the running node sends them)")
    add_common(ob_retry)
    ob_retry.add_argument("--id", dest="ids", type=int, nargs="+", default=None, metavar="N",
                          help="these entries (ids from `outbox list`)")
    ob_retry.add_argument("--destination", default=None,
                          help="dead entries of this destination")
    ob_retry.add_argument("--all-dead", action="store_true", help="every dead entry")
    ob_retry.set_defaults(func=_cmd_outbox_retry)

    notes = sub.add_parser("notifications", help="webhook/e-mail notifications: sent or dead")
    notes_sub = notes.add_subparsers(dest="notifications_command", required=True)
    nt_list = notes_sub.add_parser("list", help="list notifications, newest first")
    add_common(nt_list)
    nt_list.add_argument("--status", choices=("pending", "sent", "dead"), default=None)
    nt_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    nt_list.add_argument("--limit", type=int, default=200)
    nt_list.set_defaults(func=_cmd_notifications_list)
    nt_retry = notes_sub.add_parser(
        "retry", help="make dead notifications pending again (the running node sends them)")
    add_common(nt_retry)
    nt_retry.add_argument("--id", dest="ids", type=int, nargs="+", default=None, metavar="N")
    nt_retry.add_argument("--all-dead", action="store_true", help="every dead notification")
    nt_retry.set_defaults(func=_cmd_notifications_retry)
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
