"""Worklist API latency with 10,000 items, through a real uvicorn server and httpx.

Fills a fresh state database with 10,000 studies as the node would leave them (processed
items of every tier with findings and scores, plus studies still receiving, queued or being
processed, some claimed and read), starts the API (``create_app`` on a real ``Node``) with
uvicorn on a loopback port, and times ``GET /api/worklist`` requests as a console would make
them: the first page, a tier filter, a deep page, the claimed filter.

Target: p95 ≤ 50 ms at 10,000 items. Run: ``python -m bench.worklist_api [--items N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from triage_node.api.app import create_app
from triage_node.config.models import DicomConfig, NodeConfig, TrustedCaller
from triage_node.detectors.findings import Urgency
from triage_node.node import Node

TOKEN = "bench-token"
TIER_WEIGHTS = {Urgency.CRITICAL: 2, Urgency.URGENT: 5, Urgency.ROUTINE: 10,
                Urgency.NEGATIVE: 60, Urgency.FAILED: 1, Urgency.NOT_APPLICABLE: 12}
PENDING = {"receiving": 3, "complete": 4, "processing": 3}


def fill(node: Node, items: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    now = time.time()
    tiers = list(TIER_WEIGHTS) + list(PENDING)
    weights = list(TIER_WEIGHTS.values()) + list(PENDING.values())
    with node.db.transaction() as conn:
        for i in range(items):
            uid = f"1.2.826.0.1.3680043.10.999.{i}"
            key = f"bench{i:06d}"
            arrived = now - rng.uniform(0, 7 * 86400)
            kind = rng.choices(tiers, weights)[0]
            status = kind if isinstance(kind, str) else "processed"
            conn.execute(
                "INSERT INTO studies (study_uid, study_key, status, attrs_json, first_received,"
                " last_received, completed_at) VALUES (?,?,?,'{}',?,?,?)",
                (uid, key, status, arrived, arrived + 5, arrived + 35))
            if isinstance(kind, Urgency):
                findings: list[dict[str, Any]] = []
                if kind in (Urgency.CRITICAL, Urgency.URGENT):
                    findings.append({"detector": "ct-head-hemorrhage", "label": "hemorrhage",
                                     "score": round(rng.uniform(0.5, 1), 4),
                                     "volume_ml": round(rng.uniform(0.3, 80), 2)})
                score = max((f["score"] for f in findings), default=None)
                delivered = rng.random() < 0.9
                conn.execute(
                    "INSERT INTO worklist (study_uid, study_key, urgency, urgency_rank, score,"
                    " status, reason, rule, detectors_json, findings_json, arrived_at,"
                    " last_received, completed_at, processed_at, delivered_at, timings_json,"
                    " updated_at) VALUES (?,?,?,?,?,?,NULL,'head-ct',?,?,?,?,?,?,?,?,?)",
                    (uid, key, str(kind), kind.rank, score,
                     "delivered" if delivered else "processed",
                     json.dumps(["ct-head-hemorrhage"]), json.dumps(findings), arrived,
                     arrived + 5, arrived + 35, arrived + 60,
                     arrived + 62 if delivered else None,
                     json.dumps({"route": 0.002, "ct-head-hemorrhage.infer": 4.1}), now))
                if rng.random() < 0.05:
                    conn.execute("INSERT INTO worklist_claims (study_uid, claimed_by, claimed_at,"
                                 " read_by, read_at, updated_at) VALUES (?,?,?,?,?,?)",
                                 (uid, f"dr-{i % 7}", arrived + 100,
                                  f"dr-{i % 7}" if rng.random() < 0.5 else None,
                                  arrived + 200, now))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    os.environ["TRIAGE_NODE_API_TOKEN"] = TOKEN
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "detectors").mkdir()
        (root / "rules.yaml").write_text("rules: []\n")
        node = Node(NodeConfig(data_dir=root / "data", rules_file=root / "rules.yaml",
                               detectors_dir=root / "detectors",
                               dicom=DicomConfig(trusted_callers=[TrustedCaller(
                                   ae_title="PACS")])))
        t = time.perf_counter()
        fill(node, args.items)
        print(f"filled {args.items} studies in {time.perf_counter() - t:.1f} s")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(node), host="127.0.0.1", port=port,
                                               log_config=None, access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        queries: dict[str, dict[str, Any]] = {
            "first page (limit 50)": {"limit": 50},
            "tier=critical&tier=urgent": {"tier": ["critical", "urgent"], "limit": 50},
            "deep page (offset 9000)": {"limit": 50, "offset": 9000},
            "status=pending": {"status": "pending", "limit": 50},
            "claimed=true": {"claimed": "true", "limit": 50},
            "limit 100 (API default)": {},
            "limit 500": {"limit": 500},
        }
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}",
                              headers={"Authorization": f"Bearer {TOKEN}"}) as client:
                print(f"GET /api/worklist, {args.items} items, {args.requests} requests each:")
                print(f"{'query':32} {'p50 ms':>8} {'p95 ms':>8} {'items':>6} {'total':>6}")
                p95s: dict[str, float] = {}
                for name, params in queries.items():
                    client.get("/api/worklist", params=params).raise_for_status()  # warm-up
                    times = []
                    for _ in range(args.requests):
                        t = time.perf_counter()
                        r = client.get("/api/worklist", params=params)
                        times.append((time.perf_counter() - t) * 1000)
                        r.raise_for_status()
                    p95s[name] = _percentile(times, 0.95)
                    print(f"{name:32} {statistics.median(times):8.1f} "
                          f"{_percentile(times, 0.95):8.1f} {len(r.json()):6d} "
                          f"{r.headers['X-Total-Count']:>6}")
            first = p95s["first page (limit 50)"]
            print(f"target p95 <= 50 ms for a page of 50: {first:.1f} ms, "
                  f"{'met' if first <= 50 else 'MISSED'} (load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            node.db.close()


if __name__ == "__main__":
    main()
