-- triage-node state database (SQLite). One file under the data dir; the spool folder holds the bytes.
-- UIDs are stored here (the node must find studies again) but never written to logs:
-- logs use study_key, an opaque id assigned on first receipt.

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS studies (
    study_uid        TEXT PRIMARY KEY,
    study_key        TEXT NOT NULL UNIQUE,
    status           TEXT NOT NULL,          -- receiving | complete | processing | processed | failed
    attrs_json       TEXT NOT NULL,          -- study-level attributes of the first instance
    calling_ae       TEXT,
    called_ae        TEXT,
    source_host      TEXT,
    first_received   REAL NOT NULL,
    last_received    REAL NOT NULL,
    completed_at     REAL,
    processed_at     REAL,
    generation       INTEGER NOT NULL DEFAULT 0,  -- bumped when a late instance reopens the study
    receiving_since  REAL                    -- start of the current generation's receiving
);
CREATE INDEX IF NOT EXISTS studies_status ON studies(status, last_received);

CREATE TABLE IF NOT EXISTS series (
    series_uid     TEXT PRIMARY KEY,
    study_uid      TEXT NOT NULL REFERENCES studies(study_uid),
    series_key     TEXT NOT NULL UNIQUE,
    modality       TEXT,
    attrs_json     TEXT NOT NULL,            -- series-level attributes of the first instance
    instance_count INTEGER NOT NULL DEFAULT 0,
    first_received REAL,
    last_received  REAL,
    expected_instances INTEGER,              -- Images in Acquisition (0020,1002), when sent
    completed_at   REAL                      -- NULL while the series may still grow
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);

CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid       TEXT NOT NULL REFERENCES series(series_uid),
    study_uid        TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    path             TEXT NOT NULL,          -- relative to the spool root
    size             INTEGER NOT NULL,
    sha256           TEXT NOT NULL,
    attrs_delta_json TEXT NOT NULL DEFAULT '{}',  -- attributes that differ from the series'
    received_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);

CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid    TEXT NOT NULL,
    generation   INTEGER NOT NULL,
    priority     INTEGER NOT NULL,           -- lower runs first
    status       TEXT NOT NULL,              -- queued | running | done | failed
    created_at   REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    error        TEXT,
    UNIQUE (study_uid, generation)
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(status, priority, created_at);

CREATE TABLE IF NOT EXISTS outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid        TEXT NOT NULL,
    destination      TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    kind             TEXT NOT NULL,          -- SEG | SR | KO | SC (the result's modality)
    action           TEXT NOT NULL DEFAULT 'store',  -- store | retract (superseded result)
    path             TEXT NOT NULL,          -- relative to the results root
    status           TEXT NOT NULL,          -- pending | delivered | dead
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,
    last_error       TEXT,
    created_at       REAL NOT NULL,
    delivered_at     REAL,
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(status, next_attempt_at);

CREATE TABLE IF NOT EXISTS worklist (
    study_uid      TEXT PRIMARY KEY,
    study_key      TEXT NOT NULL,
    urgency        TEXT NOT NULL,
    urgency_rank   INTEGER NOT NULL,
    score          REAL,
    status         TEXT NOT NULL,            -- processed | delivered | not-applicable | failed
    reason         TEXT,
    rule           TEXT,                     -- the routing rule that decided
    detectors_json TEXT NOT NULL,
    findings_json  TEXT NOT NULL,
    arrived_at     REAL NOT NULL,          -- first instance received
    last_received  REAL,
    completed_at   REAL,
    processed_at   REAL,
    delivered_at   REAL,
    timings_json   TEXT NOT NULL DEFAULT '{}',  -- seconds per processing step
    updated_at     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS worklist_order ON worklist(urgency_rank, arrived_at);

CREATE TABLE IF NOT EXISTS rule_stats (
    rule            TEXT PRIMARY KEY,
    matches         INTEGER NOT NULL DEFAULT 0,
    last_matched_at REAL
);

-- Radiologist actions on worklist items (issue 8). A separate table rather than new columns
-- on `worklist`, so an existing database gains it through CREATE TABLE IF NOT EXISTS alone;
-- it also survives a re-run of the study, which replaces the worklist row.
CREATE TABLE IF NOT EXISTS worklist_claims (
    study_uid   TEXT PRIMARY KEY,
    claimed_by  TEXT,                        -- API user name (staff, never patient data)
    claimed_at  REAL,
    read_by     TEXT,
    read_at     REAL,
    updated_at  REAL NOT NULL
);

-- Radiologist feedback on the AI's findings: one row per verdict, never updated.
CREATE TABLE IF NOT EXISTS feedback (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid      TEXT NOT NULL,
    detector       TEXT NOT NULL,
    finding_index  INTEGER,                  -- index in the item's findings; NULL: the study's result
    label          TEXT,                     -- the finding's label when finding_index is set
    verdict        TEXT NOT NULL,            -- agree | disagree | comment
    comment        TEXT,
    user           TEXT NOT NULL,
    created_at     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_study ON feedback(study_uid, created_at);
CREATE INDEX IF NOT EXISTS feedback_detector ON feedback(detector, created_at);

-- Who did what, append-only: the triggers refuse UPDATE and DELETE. No patient data: studies
-- are named by study_key, details carry only allow-listed keys (triage_node/audit.py).
CREATE TABLE IF NOT EXISTS audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
    user        TEXT NOT NULL,
    role        TEXT NOT NULL,
    action      TEXT NOT NULL,
    study_key   TEXT,
    detail_json TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_at ON audit(at);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;

-- Throughput and error figures of /api/system and /metrics read finished jobs by time.
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at);
-- The worklist's default order (tier, score highest first, arrival), so a page is read in
-- index order without sorting every item.
CREATE INDEX IF NOT EXISTS worklist_page
    ON worklist(urgency_rank, score IS NULL, score DESC, arrived_at, study_key);

-- Notifications of flagged studies (issue 8, triage_node/notify): queued in the transaction
-- that records the result, one row per study, channel and tier, so a re-run with the same tier
-- never notifies twice. context_json holds the template variables without patient data.
CREATE TABLE IF NOT EXISTS notifications (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid       TEXT NOT NULL,
    study_key       TEXT NOT NULL,
    channel         TEXT NOT NULL,           -- a name under notifications.webhooks / .emails
    kind            TEXT NOT NULL,           -- webhook | email
    tier            TEXT NOT NULL,
    context_json    TEXT NOT NULL,
    status          TEXT NOT NULL,           -- pending | sent | dead
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,           -- due time; for dead: when it was given up
    last_error      TEXT,
    created_at      REAL NOT NULL,
    sent_at         REAL,
    UNIQUE (study_uid, channel, tier)
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications(status, next_attempt_at);
CREATE INDEX IF NOT EXISTS notifications_study ON notifications(study_uid);
