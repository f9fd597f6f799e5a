"""The worklist model: every study visible, configurable order, filters, claims and reads."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from triage_node.detectors.findings import Urgency
from triage_node.state.db import Database
from triage_node.worklist.store import (
    ClaimConflict,
    FindingSummary,
    NotClaimed,
    NotClaimHolder,
    StudyNotFound,
    WorklistStore,
)


def _study(db: Database, uid: str, status: str, arrived: float) -> None:
    db.connection().execute(
        "INSERT INTO studies (study_uid, study_key, status, attrs_json, first_received,"
        " last_received) VALUES (?, ?, ?, '{}', ?, ?)", (uid, "k-" + uid, status, arrived,
                                                        arrived))


def _processed(store: WorklistStore, uid: str, urgency: Urgency, arrived: float,
               score: float | None = None, status: str = "processed") -> None:
    _study(store.db, uid, "processed", arrived)
    findings = [FindingSummary("d", "bleed", score, 2.0)] if score is not None else []
    with store.db.transaction() as conn:
        store.upsert(conn, study_uid=uid, study_key="k-" + uid, urgency=urgency, status=status,
                     reason=None, rule="r", detectors=["d"], findings=findings,
                     arrived_at=arrived, last_received=arrived, completed_at=arrived + 1)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "state.sqlite3")


def test_every_received_study_is_listed_with_why(db: Database) -> None:
    store = WorklistStore(db)
    _processed(store, "1", Urgency.NEGATIVE, 1.0)
    _study(db, "2", "receiving", 2.0)
    _study(db, "3", "complete", 3.0)
    _study(db, "4", "processing", 4.0)
    _study(db, "5", "failed", 5.0)
    db.connection().execute("INSERT INTO jobs (study_uid, generation, priority, status,"
                            " created_at, error) VALUES ('5', 0, 1, 'failed', 5, 'internal"
                            " error: KeyError')")
    items = {i.study_key: i for i in store.items()}
    assert {k: (i.tier, i.status, i.pending) for k, i in items.items()} == {
        "k-1": ("negative", "processed", False),
        "k-2": (None, "receiving", True),
        "k-3": (None, "queued", True),
        "k-4": (None, "processing", True),
        "k-5": ("failed", "failed", False),
    }
    assert items["k-5"].reason == "internal error: KeyError"
    # pending (unknown result) ranks after routine and before negative
    assert [i.study_key for i in store.items()] == ["k-2", "k-3", "k-4", "k-1", "k-5"]
    assert store.counts_by_tier() == {"pending": 3, "negative": 1, "failed": 1}


def test_a_study_being_processed_again_keeps_its_tier_and_shows_the_live_status(
        db: Database) -> None:
    store = WorklistStore(db)
    _processed(store, "1", Urgency.CRITICAL, 1.0, score=0.8, status="delivered")
    db.connection().execute("UPDATE studies SET status='processing' WHERE study_uid='1'")
    item = store.item("k-1")
    assert (item.tier, item.status, item.pending) == ("critical", "processing", True)


def test_order_is_tier_then_score_then_arrival_and_configurable(db: Database) -> None:
    store = WorklistStore(db)
    _processed(store, "a", Urgency.URGENT, 1.0, score=0.6)
    _processed(store, "b", Urgency.CRITICAL, 2.0, score=0.7)
    _processed(store, "c", Urgency.CRITICAL, 3.0, score=0.95)
    _processed(store, "d", Urgency.CRITICAL, 0.5, score=0.7)
    _processed(store, "e", Urgency.ROUTINE, 0.1)
    assert [i.study_key for i in store.items()] == ["k-c", "k-d", "k-b", "k-a", "k-e"]
    by_arrival = WorklistStore(db, order=["arrival"])
    assert [i.study_key for i in by_arrival.items()] == ["k-e", "k-d", "k-a", "k-b", "k-c"]
    by_score = WorklistStore(db, order=["score", "tier"])
    assert [i.study_key for i in by_score.items()] == ["k-c", "k-d", "k-b", "k-a", "k-e"]
    with pytest.raises(ValueError, match="order keys"):
        WorklistStore(db, order=["urgency"])


def test_filters_and_paging(db: Database) -> None:
    store = WorklistStore(db)
    for i in range(7):
        _processed(store, f"c{i}", Urgency.CRITICAL, float(i), score=0.5)
    _processed(store, "n", Urgency.NEGATIVE, 10.0)
    _study(db, "p", "receiving", 11.0)
    page = store.page(tiers=["critical"], limit=3, offset=3)
    assert page.total == 7 and [i.study_key for i in page.items] == ["k-c3", "k-c4", "k-c5"]
    assert [i.study_key for i in store.page(statuses=["pending"]).items] == ["k-p"]
    assert store.page(statuses=["processed"], tiers=["negative"]).total == 1
    store.claim("k-c1", "dr-a")
    store.mark_read("k-c2", "dr-b")
    assert [i.study_key for i in store.page(claimed=True).items] == ["k-c1"]
    assert store.page(claimed=False).total == 8
    assert [i.study_key for i in store.page(claimed_by="dr-a").items] == ["k-c1"]
    assert [i.study_key for i in store.page(read=True).items] == ["k-c2"]
    with pytest.raises(ValueError, match="unknown tier 'high'"):
        store.page(tiers=["high"])
    with pytest.raises(ValueError, match="unknown status 'done'"):
        store.page(statuses=["done"])


def test_claim_release_and_read_record_who_and_when(db: Database) -> None:
    store = WorklistStore(db)
    _processed(store, "1", Urgency.CRITICAL, 1.0, score=0.9)
    before = time.time()
    item = store.claim("k-1", "dr-a")
    assert item.claimed_by == "dr-a" and item.claimed_at is not None
    assert item.claimed_at >= before
    assert store.claim("k-1", "dr-a").claimed_at == item.claimed_at  # idempotent
    with pytest.raises(ClaimConflict) as conflict:
        store.claim("k-1", "dr-b")
    assert conflict.value.claimed_by == "dr-a"
    with pytest.raises(ClaimConflict):
        store.mark_read("k-1", "dr-b")
    with pytest.raises(NotClaimHolder):
        store.release("k-1", "dr-b")
    read = store.mark_read("k-1", "dr-a")
    assert read.read_by == "dr-a" and read.read_at is not None
    assert store.release("k-1", "dr-b", force=True).claimed_by is None
    with pytest.raises(NotClaimed):
        store.release("k-1", "dr-a")
    assert store.claim("k-1", "dr-b").claimed_by == "dr-b"
    # the claim and read survive a re-run that replaces the worklist row
    with db.transaction() as conn:
        store.upsert(conn, study_uid="1", study_key="k-1", urgency=Urgency.NEGATIVE,
                     status="processed", reason=None, rule="r", detectors=["d"], findings=[],
                     arrived_at=1.0, last_received=1.0, completed_at=2.0)
    again = store.item("k-1")
    assert (again.tier, again.claimed_by, again.read_by) == ("negative", "dr-b", "dr-a")
    with pytest.raises(StudyNotFound):
        store.claim("nope", "dr-a")


def test_item_carries_stage_timestamps_and_summary(db: Database) -> None:
    store = WorklistStore(db)
    _processed(store, "1", Urgency.CRITICAL, 100.0, score=0.91)
    _processed(store, "2", Urgency.NEGATIVE, 100.0)
    with db.transaction() as conn:
        store.mark_delivered(conn, "1")
    data = store.item("k-1").to_dict()
    stamps = data["timestamps"]
    assert stamps["received"] == 100.0 and stamps["complete"] == 101.0
    assert stamps["inferred"] is not None and stamps["delivered"] is not None
    assert stamps["flagged"] == stamps["inferred"]  # critical: flagged when processed
    assert data["summary"] == "bleed 2.0 mL p=0.91" and data["detectors"] == ["d"]
    assert store.item("k-2").to_dict()["timestamps"]["flagged"] is None


def test_events_reach_subscribers_on_their_loop(db: Database) -> None:
    store = WorklistStore(db)
    _processed(store, "1", Urgency.CRITICAL, 1.0, score=0.9)
    assert store.events.publish("claimed", "k-1") is None  # nobody listens: nothing built

    async def listen() -> list[dict[str, object]]:
        sub = store.events.subscribe(asyncio.get_running_loop())
        await asyncio.to_thread(store.notify, "claimed", "k-1", user="dr-a")
        got = await sub.get(timeout=5)
        store.events.unsubscribe(sub)
        assert got is not None
        return [got.to_dict()]

    (event,) = asyncio.run(listen())
    assert event["type"] == "claimed" and event["user"] == "dr-a"
    item = event["item"]
    assert isinstance(item, dict) and item["study_key"] == "k-1"
    assert store.events.listeners == 0


def test_a_slow_subscriber_is_told_it_lagged(db: Database) -> None:
    from triage_node.worklist.events import WorklistEvents

    events = WorklistEvents(max_queue=3)

    async def flood() -> list[str]:
        sub = events.subscribe(asyncio.get_running_loop())
        for _ in range(10):
            events.publish("processed", None)
        await asyncio.sleep(0.05)
        seen = []
        while (got := await sub.get(timeout=0.05)) is not None:
            seen.append(got.type)
        return seen

    seen = asyncio.run(flood())
    assert seen[-1] == "lagged" and len(seen) == 3


def test_the_summary_gives_nodules_by_diameter_and_tumours_with_their_shift() -> None:
    from triage_node.detectors.findings import Code, Finding
    from triage_node.worklist.store import summarize

    code = Code(value="1", scheme="SCT", meaning="x")
    nodule = Finding(label="nodule", finding_type=code, category=code, score=0.78, tracking_id="n1",
                     volume_ml=20.9, measurements={"long_axis_diameter_mm": 34.4})
    tumour = Finding(label="tumour", finding_type=code, category=code, score=0.99, tracking_id="t1",
                     volume_ml=33.8, measurements={"midline_shift_mm": 6.24})
    bleed = Finding(label="hemorrhage", finding_type=code, category=code, score=0.95,
                    tracking_id="h1", volume_ml=24.8)
    rows = [FindingSummary.of("ct-chest-nodule", "nodule", nodule).to_dict(),
            FindingSummary.of("mr-brain-tumor", "tumour", tumour).to_dict(),
            FindingSummary.of("ct-head-hemorrhage", "hemorrhage", bleed).to_dict()]
    assert rows[0]["diameter_mm"] == 34.4 and "shift_mm" not in rows[0]
    assert summarize(rows) == ("nodule 34 mm p=0.78, tumour 33.8 mL (midline shift 6.2 mm) "
                               "p=0.99, hemorrhage 24.8 mL p=0.95")
