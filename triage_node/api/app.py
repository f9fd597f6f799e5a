"""The REST API (FastAPI): worklist, studies, feedback, rules, detectors, system, live events.

Every ``/api`` route and ``/metrics`` needs ``Authorization: Bearer <token>``; tokens carry a
user and a role (:mod:`triage_node.api.auth`). With no token configured the API refuses every
request instead of running open. Studies are addressed by ``study_key`` in URLs, never by UID;
UIDs appear only in response bodies. The OpenAPI documentation is served at ``/docs``.
See docs/api.md.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, model_validator

from triage_node import __version__
from triage_node.api.auth import Principal, TokenTable, check_role
from triage_node.api.console import console_router
from triage_node.api.stow import store_instances
from triage_node.api.views import detectors_view, study_detail, system_view
from triage_node.audit import AuditLog
from triage_node.deliver.outbox import retry_dead
from triage_node.errors import DeliveryError, InvalidDicomError, TriageError
from triage_node.metrics import build_registry
from triage_node.worklist.feedback import FeedbackStore, InvalidFeedback
from triage_node.worklist.store import (
    TIERS,
    ClaimConflict,
    NotClaimed,
    NotClaimHolder,
    StudyNotFound,
    WorklistItem,
)

if TYPE_CHECKING:
    from triage_node.node import Node

_bearer = HTTPBearer(auto_error=False)


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study_instance_uid: str | None = None
    """A study this node has received."""
    orthanc_study: str | None = None
    """A study in the configured Orthanc: its Orthanc id or Study Instance UID."""

    @model_validator(mode="after")
    def _exactly_one(self) -> ExplainRequest:
        if (self.study_instance_uid is None) == (self.orthanc_study is None):
            raise ValueError("give exactly one of study_instance_uid, orthanc_study")
        return self


class ProcessRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    orthanc_study: str


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    verdict: Literal["agree", "disagree", "comment"]
    finding_index: int | None = Field(default=None, ge=0)
    """Index in the item's ``findings``; omit for the detector's result as a whole
    (e.g. disagree with a negative)."""
    detector: str | None = None
    """Needed without ``finding_index`` when several detectors ran."""
    comment: str | None = Field(default=None, max_length=2000)


class OutboxRetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[int] = Field(default_factory=list)
    destination: str | None = None


def _http_error(exc: TriageError) -> HTTPException:
    if isinstance(exc, ClaimConflict):
        return HTTPException(status.HTTP_409_CONFLICT, detail={
            "message": str(exc), "claimed_by": exc.claimed_by, "claimed_at": exc.claimed_at})
    if isinstance(exc, NotClaimHolder):
        return HTTPException(status.HTTP_403_FORBIDDEN, detail=str(exc))
    if isinstance(exc, NotClaimed):
        return HTTPException(status.HTTP_409_CONFLICT, detail=str(exc))
    if isinstance(exc, StudyNotFound | InvalidDicomError):
        return HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc))
    if isinstance(exc, DeliveryError):
        return HTTPException(status.HTTP_502_BAD_GATEWAY, detail=str(exc))
    return HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, detail=str(exc))


def _authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    tokens: TokenTable = request.app.state.tokens
    if credentials is None or credentials.scheme.lower() != "bearer":
        if tokens.empty:
            tokens.resolve("")  # raises: no token configured
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="missing bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    return tokens.resolve(credentials.credentials)


def _radiologist(principal: Annotated[Principal, Depends(_authenticate)]) -> Principal:
    return check_role(principal, "radiologist")


def _admin(principal: Annotated[Principal, Depends(_authenticate)]) -> Principal:
    return check_role(principal, "admin")


def _monitoring(principal: Annotated[Principal, Depends(_authenticate)]) -> Principal:
    return check_role(principal, "monitoring")


def _stream_reader(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    token: Annotated[str | None, Query(
        description="The bearer token, for browsers' EventSource, which cannot send "
                    "headers (see docs/api.md for the trade-off)")] = None,
) -> Principal:
    if credentials is None and token is not None:
        return check_role(request.app.state.tokens.resolve(token), "radiologist")
    return _radiologist(_authenticate(request, credentials))


Radiologist = Annotated[Principal, Depends(_radiologist)]
"""Any configured user (admins have the radiologist role too)."""
Admin = Annotated[Principal, Depends(_admin)]
Monitoring = Annotated[Principal, Depends(_monitoring)]
"""The Prometheus scraper's role (and admins): operational figures, no patient data."""
Authenticated = Annotated[Principal, Depends(_authenticate)]
"""Any configured user, whatever the role."""
StreamReader = Annotated[Principal, Depends(_stream_reader)]


def _sse(event_id: int | None, event: str, data: dict[str, Any]) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(node: Node, *, sse_keepalive_seconds: float = 15.0) -> FastAPI:
    app = FastAPI(title="triage-node", version=__version__,
                  description="AI triage node: worklist, studies, feedback, routing rules, "
                              "detectors, node status and live worklist events. "
                              "See docs/api.md.")
    app.state.tokens = TokenTable(node.config.api)
    audit = AuditLog(node.db)
    feedback = FeedbackStore(node.db, node.worklist)
    registry = build_registry(node.db, node.spool.root, TIERS, node.worklist.counts_by_tier)

    def record(who: Principal, action: str, study_key: str | None = None,
               **detail: str | int | float | bool | None) -> None:
        audit.record(user=who.user, role=who.role, action=action, study_key=study_key,
                     **detail)

    def item_or_error(fn: Callable[[], WorklistItem]) -> WorklistItem:
        try:
            return fn()
        except TriageError as exc:
            raise _http_error(exc) from exc

    # --- public ------------------------------------------------------------------------------

    @app.get("/healthz", tags=["system"])
    def healthz() -> dict[str, Any]:
        """Liveness: answers without a token, says nothing about patients."""
        return {"status": "ok", "version": __version__, "queue_depth": node.jobs.depth()}

    @app.get("/metrics", tags=["system"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics(_: Monitoring) -> Response:
        """Prometheus metrics (text exposition format); a monitoring or admin token."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/me", tags=["system"])
    def me(principal: Authenticated) -> dict[str, str]:
        """Who the token belongs to and its role (for the console)."""
        return {"user": principal.user, "role": principal.role}

    # --- worklist ---------------------------------------------------------------------------

    @app.get("/api/worklist", tags=["worklist"])
    def get_worklist(
        _: Radiologist,
        tier: Annotated[list[str] | None, Query(
            description="critical, urgent, routine, negative, failed, not-applicable")] = None,
        status_: Annotated[list[str] | None, Query(
            alias="status", description="pending (= receiving, queued, processing), "
            "receiving, queued, processing, processed, delivered, not-applicable, failed")]
            = None,
        claimed: bool | None = None,
        claimed_by: str | None = None,
        read: bool | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> JSONResponse:
        """Worklist items in the configured order (default: tier, score, arrival).

        Every received study is listed, pending ones included. The total number of items
        matching the filters is in the ``X-Total-Count`` header."""
        try:
            page = node.worklist.page(tiers=tier or [], statuses=status_ or [],
                                      claimed=claimed, claimed_by=claimed_by, read=read,
                                      limit=limit, offset=offset)
        except ValueError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, detail=str(exc)) from exc
        # A JSONResponse skips FastAPI's validation of the return value: at 500 items that
        # validation costs more than the query.
        return JSONResponse([item.to_dict() for item in page.items],
                            headers={"X-Total-Count": str(page.total)})

    @app.get("/api/worklist/{study_key}", tags=["worklist"])
    def get_item(_: Radiologist, study_key: str) -> dict[str, Any]:
        """One worklist item."""
        return item_or_error(lambda: node.worklist.item(study_key)).to_dict()

    @app.post("/api/worklist/{study_key}/claim", tags=["worklist"])
    def claim(who: Radiologist, study_key: str) -> dict[str, Any]:
        """Claim the study for reading. 409 with ``claimed_by`` when someone else holds it."""
        item = item_or_error(lambda: node.worklist.claim(study_key, who.user))
        record(who, "worklist.claim", study_key)
        node.worklist.notify("claimed", study_key, user=who.user)
        return item.to_dict()

    @app.post("/api/worklist/{study_key}/release", tags=["worklist"])
    def release(who: Radiologist, study_key: str) -> dict[str, Any]:
        """Release a claim: only its holder, or an admin."""
        holder = item_or_error(lambda: node.worklist.item(study_key)).claimed_by
        item = item_or_error(lambda: node.worklist.release(
            study_key, who.user, force=who.role == "admin"))
        forced = holder != who.user
        record(who, "worklist.release", study_key, forced=forced,
               previous_holder=holder if forced else None)
        node.worklist.notify("released", study_key, user=who.user)
        return item.to_dict()

    @app.post("/api/worklist/{study_key}/read", tags=["worklist"])
    def mark_read(who: Radiologist, study_key: str) -> dict[str, Any]:
        """Mark the study read by the caller (409 while another user holds the claim)."""
        item = item_or_error(lambda: node.worklist.mark_read(study_key, who.user))
        record(who, "worklist.read", study_key)
        node.worklist.notify("read", study_key, user=who.user)
        return item.to_dict()

    # --- studies and feedback --------------------------------------------------------------

    @app.get("/api/studies/{study_key}", tags=["studies"])
    def get_study(_: Radiologist, study_key: str) -> dict[str, Any]:
        """Status, timeline with durations, findings, feedback, processing runs, and the
        result objects with their delivery state (Orthanc links for Orthanc destinations)."""
        item = item_or_error(lambda: node.worklist.item(study_key))
        return study_detail(node, item, [f.to_dict() for f in feedback.for_study(study_key)])

    @app.post("/api/studies/{study_key}/feedback", tags=["feedback"],
              status_code=status.HTTP_201_CREATED)
    def post_feedback(who: Radiologist, study_key: str,
                      body: FeedbackRequest) -> dict[str, Any]:
        """Agree, disagree or comment on one finding (or on a detector's whole result)."""
        try:
            entry = feedback.add(study_key, who.user, verdict=body.verdict,
                                 finding_index=body.finding_index, detector=body.detector,
                                 comment=body.comment)
        except InvalidFeedback as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, detail=str(exc)) from exc
        except TriageError as exc:
            raise _http_error(exc) from exc
        record(who, "feedback", study_key, detector=entry.detector, verdict=entry.verdict,
               finding_index=entry.finding_index, label=entry.label)
        node.worklist.notify("feedback", study_key, user=who.user, verdict=entry.verdict,
                             detector=entry.detector)
        return entry.to_dict()

    @app.get("/api/studies/{study_key}/feedback", tags=["feedback"])
    def get_feedback(_: Radiologist, study_key: str) -> list[dict[str, Any]]:
        try:
            return [f.to_dict() for f in feedback.for_study(study_key)]
        except TriageError as exc:
            raise _http_error(exc) from exc

    @app.get("/api/feedback/summary", tags=["feedback"])
    def feedback_summary(_: Radiologist, since: float | None = None) -> dict[str, Any]:
        """Agreement rate (agree / (agree + disagree)) per detector, overall and per ISO week
        (UTC). ``since``: only feedback from this time (epoch seconds) on."""
        return feedback.summary(since)

    @app.post("/api/studies/{study_key}/rerun", tags=["studies"])
    def rerun(who: Admin, study_key: str) -> dict[str, Any]:
        """Queue the study for processing again with the rules and detectors in force."""
        try:
            generation = node.assembler.force_complete(node.worklist.study_uid(study_key))
        except TriageError as exc:
            raise _http_error(exc) from exc
        record(who, "study.rerun", study_key, generation=generation)
        node.worklist.notify("rerun", study_key)
        return {"study_key": study_key, "generation": generation}

    @app.post("/api/studies/process", tags=["studies"])
    def process_study(who: Admin, request: ProcessRequest) -> dict[str, Any]:
        """Fetch a study from Orthanc by DICOMweb and run it through routing again."""
        try:
            result = node.process_orthanc_study(request.orthanc_study)
        except TriageError as exc:
            raise _http_error(exc) from exc
        record(who, "study.process", str(result["study_key"]),
               instances=int(str(result["instances"])))
        return result

    # --- rules, detectors ---------------------------------------------------------------------

    @app.get("/api/rules", tags=["rules"])
    def get_rules(_: Radiologist) -> dict[str, Any]:
        """The rules in force, with per-rule match counters and last-matched time."""
        holder = node.rules
        stats = node.rule_stats()
        ruleset = holder.router.ruleset

        def entry(name: str, action: Any, extra: dict[str, Any]) -> dict[str, Any]:
            return {"name": name, **extra, "detectors": action.detectors,
                    "priority": str(action.priority), "destinations": action.destinations,
                    "ignore": action.ignore, "matches": stats.get(name, {}).get("matches", 0),
                    "last_matched_at": stats.get(name, {}).get("last_matched_at")}

        rules = [entry(r.name, r, {"description": r.description,
                                   "when": r.when.model_dump(by_alias=True, exclude_none=True)})
                 for r in ruleset.rules]
        return {"file": str(holder.path), "loaded_at": holder.loaded_at,
                "last_reload_error": holder.last_error, "rules": rules,
                "fallback": entry("fallback", ruleset.fallback, {})
                if ruleset.fallback is not None else None}

    @app.post("/api/rules/reload", tags=["rules"])
    def reload_rules(who: Admin) -> dict[str, Any]:
        """Re-read the rules file now; an invalid file is refused and the old rules stay."""
        result = node.rules.reload()
        record(who, "rules.reload", ok=result.ok, rules=result.rules if result.ok else None)
        if not result.ok:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                                detail={"message": "rules file rejected; previous rules stay",
                                        "errors": result.errors.splitlines()})
        return {"reloaded": True, "rules": result.rules}

    @app.post("/api/rules/explain", tags=["rules"])
    def explain_rules(_: Admin, request: ExplainRequest) -> dict[str, Any]:
        """Dry run: every rule's conditions with the values seen, series selection, decision."""
        try:
            return node.explain(study_uid=request.study_instance_uid,
                                orthanc_study=request.orthanc_study).to_dict()
        except TriageError as exc:
            raise _http_error(exc) from exc

    @app.get("/api/detectors", tags=["detectors"])
    def get_detectors(_: Radiologist) -> list[dict[str, Any]]:
        """Loaded detectors: name, version, modalities, thresholds, held-out metrics."""
        return detectors_view(node)

    # --- admin --------------------------------------------------------------------------------

    @app.get("/api/system", tags=["system"])
    def get_system(_: Admin) -> dict[str, Any]:
        """Queue depth, throughput in the last hour, errors by kind, receiver processes,
        workers, outbox counts, quarantine, worklist counts by tier."""
        return system_view(node)

    @app.post("/api/outbox/retry", tags=["system"])
    def outbox_retry(who: Admin, body: OutboxRetryRequest) -> dict[str, Any]:
        """Make dead outbox entries pending again (all, by id and/or destination)."""
        revived = retry_dead(node.db, ids=body.ids, destination=body.destination)
        record(who, "outbox.retry", count=len(revived), destination=body.destination)
        return {"retried": revived}

    @app.get("/api/audit", tags=["system"])
    def get_audit(
        _: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        before_id: int | None = None, action: str | None = None, user: str | None = None,
    ) -> list[dict[str, Any]]:
        """The audit log, newest first; page with ``before_id`` = last id seen."""
        return [e.to_dict() for e in audit.entries(limit=limit, before_id=before_id,
                                                   action=action, user=user)]

    # --- live events --------------------------------------------------------------------------

    @app.get("/api/events", tags=["worklist"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def events(request: Request,
                     _: StreamReader) -> StreamingResponse:
        """Server-Sent Events: one event per worklist change (``processed``, ``delivered``,
        ``claimed``, ``released``, ``read``, ``feedback``, ``rerun``), its data the change
        and the item as ``GET /api/worklist/{study_key}`` returns it. ``lagged`` means events
        were dropped for this client: re-read the worklist."""
        bus = node.worklist.events
        sub = bus.subscribe(asyncio.get_running_loop())

        async def stream() -> AsyncIterator[str]:
            try:
                yield "retry: 3000\n: connected\n\n"
                # A client that went away is noticed when a write fails (at the latest the
                # next keep-alive); then the generator is closed and `finally` unsubscribes.
                while True:
                    event = await sub.get(timeout=sse_keepalive_seconds)
                    if event is None:
                        yield ": keep-alive\n\n"
                        continue
                    yield _sse(event.id, event.type, event.to_dict())
            finally:
                bus.unsubscribe(sub)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    # --- DICOMweb -----------------------------------------------------------------------------

    @app.post("/dicomweb/studies", tags=["dicomweb"], response_class=Response,
              responses={200: {"content": {"application/dicom+json": {}}}})
    async def stow(_: Admin, request: Request) -> Response:
        """STOW-RS: store instances (multipart/related; type="application/dicom")."""
        return await store_instances(request, node.ingestor, node.config.dicom.ae_title)

    # --- web console (static pages; data through the API above) and result previews ------

    app.include_router(console_router(node, reader=_radiologist))

    return app
