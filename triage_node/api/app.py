"""The REST API (FastAPI): health, worklist and routing rules.

Every ``/api`` route needs ``Authorization: Bearer <token>``; the token is read from the
environment variable named in the config (``TRIAGE_NODE_API_TOKEN`` by default). With no
token configured the API refuses every request instead of running open.
"""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, model_validator

from triage_node import __version__
from triage_node.api.stow import store_instances
from triage_node.errors import DeliveryError, InvalidDicomError, TriageError

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


def _http_error(exc: TriageError) -> HTTPException:
    if isinstance(exc, InvalidDicomError):
        return HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc))
    if isinstance(exc, DeliveryError):
        return HTTPException(status.HTTP_502_BAD_GATEWAY, detail=str(exc))
    return HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, detail=str(exc))


def create_app(node: Node) -> FastAPI:
    app = FastAPI(title="triage-node", version=__version__,
                  description="AI triage node: worklist, routing rules and node status.")
    token_env = node.config.api.token_env
    token = os.environ.get(token_env, "")

    def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if not token:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail=f"no API token is configured on the node (set {token_env})",
                headers={"WWW-Authenticate": "Bearer"})
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="missing bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_token)]

    @app.get("/healthz", tags=["system"])
    def healthz() -> dict[str, Any]:
        """Liveness: answers without a token, says nothing about patients."""
        return {"status": "ok", "version": __version__, "queue_depth": node.jobs.depth()}

    @app.get("/api/worklist", tags=["worklist"], dependencies=auth)
    def get_worklist(
        limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
    ) -> list[dict[str, Any]]:
        """Worklist items, most urgent first, then by arrival."""
        return [item.to_dict() for item in node.worklist.items(limit=limit)]

    @app.get("/api/rules", tags=["rules"], dependencies=auth)
    def get_rules() -> dict[str, Any]:
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

    @app.post("/api/rules/reload", tags=["rules"], dependencies=auth)
    def reload_rules() -> dict[str, Any]:
        """Re-read the rules file now; an invalid file is refused and the old rules stay."""
        result = node.rules.reload()
        if not result.ok:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                                detail={"message": "rules file rejected; previous rules stay",
                                        "errors": result.errors.splitlines()})
        return {"reloaded": True, "rules": result.rules}

    @app.post("/api/rules/explain", tags=["rules"], dependencies=auth)
    def explain_rules(request: ExplainRequest) -> dict[str, Any]:
        """Dry run: every rule's conditions with the values seen, series selection, decision."""
        try:
            return node.explain(study_uid=request.study_instance_uid,
                                orthanc_study=request.orthanc_study).to_dict()
        except TriageError as exc:
            raise _http_error(exc) from exc

    @app.post("/api/studies/process", tags=["studies"], dependencies=auth)
    def process_study(request: ProcessRequest) -> dict[str, Any]:
        """Fetch a study from Orthanc by DICOMweb and run it through routing again."""
        try:
            return node.process_orthanc_study(request.orthanc_study)
        except TriageError as exc:
            raise _http_error(exc) from exc

    @app.post("/dicomweb/studies", tags=["dicomweb"], dependencies=auth,
              response_class=Response,
              responses={200: {"content": {"application/dicom+json": {}}}})
    async def stow(request: Request) -> Response:
        """STOW-RS: store instances (multipart/related; type="application/dicom")."""
        return await store_instances(request, node.ingestor, node.config.dicom.ae_title)

    return app
