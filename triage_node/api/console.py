"""The web console's routes: static pages under ``/console/`` and result previews (PNG).

The pages are static files (HTML, CSS, ES modules; no build step, nothing from a CDN) and
hold no data: every figure comes from the token-protected API, fetched by the page's script
with ``Authorization: Bearer``. Console responses carry a strict Content-Security-Policy (own
origin only, no inline script or style, no framing). URLs name studies by ``study_key``
only. See docs/console.md.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.responses import FileResponse, RedirectResponse, Response

from triage_node.api.auth import Principal
from triage_node.console.preview import PreviewUnavailable, ResultPreviews
from triage_node.errors import TriageError

if TYPE_CHECKING:
    from triage_node.node import Node

STATIC = Path(__file__).resolve().parents[1] / "console" / "static"

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    # previews are fetched with the bearer token and shown from blob: URLs
    "img-src 'self' blob:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
PAGES = {"worklist": "worklist.html", "study": "study.html", "rules": "rules.html",
         "detectors": "detectors.html", "system": "system.html"}
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
          ".svg": "image/svg+xml", ".png": "image/png"}


def _asset_names() -> dict[str, Path]:
    """The servable files: read once, so a request can name nothing else (no traversal)."""
    return {p.name: p for p in STATIC.iterdir()
            if p.is_file() and p.suffix in _TYPES and p.name not in PAGES.values()}


def _file(path: Path) -> FileResponse:
    media = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "text/plain"
    if media.startswith("text/"):
        media += "; charset=utf-8"
    return FileResponse(path, media_type=media, headers=SECURITY_HEADERS)


def console_router(node: Node, reader: Callable[..., Principal]) -> APIRouter:
    """Console pages, their assets, and ``/api/studies/{key}/preview*`` (``reader`` role)."""
    router = APIRouter()
    assets = _asset_names()
    previews = ResultPreviews(node.db, node.results_root, node.spool.root)

    def page(name: str) -> FileResponse:
        return _file(STATIC / PAGES[name])

    @router.get("/console", include_in_schema=False)
    def console_root() -> RedirectResponse:
        return RedirectResponse("/console/", status_code=status.HTTP_308_PERMANENT_REDIRECT)

    @router.get("/console/", include_in_schema=False)
    def worklist_page() -> FileResponse:
        return page("worklist")

    @router.get("/console/studies/{study_key}", include_in_schema=False)
    def study_page(study_key: str) -> FileResponse:
        # The page is the same for every study (its script reads the key from the URL), so
        # an unknown key is found out by the API call, with the token.
        return page("study")

    @router.get("/console/rules", include_in_schema=False)
    def rules_page() -> FileResponse:
        return page("rules")

    @router.get("/console/detectors", include_in_schema=False)
    def detectors_page() -> FileResponse:
        return page("detectors")

    @router.get("/console/system", include_in_schema=False)
    def system_page() -> FileResponse:
        return page("system")

    @router.get("/console/assets/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        path = assets.get(name)
        if path is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such console file")
        return _file(path)

    def study_uid(study_key: str) -> str:
        try:
            return node.worklist.study_uid(study_key)
        except TriageError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc

    @router.get("/api/studies/{study_key}/previews", tags=["studies"],
                dependencies=[Depends(reader)])
    def list_previews(study_key: str) -> list[dict[str, Any]]:
        """Pictures of the study's results: each SEG on its key slice (the source slice
        with the most segment pixels), each heatmap Secondary Capture; with a caption and
        the URL of the PNG."""
        return [p.to_dict(study_key) for p in previews.for_study(study_uid(study_key))]

    @router.get("/api/studies/{study_key}/preview/{n}.png", tags=["studies"],
                dependencies=[Depends(reader)], response_class=Response,
                responses={200: {"content": {"image/png": {}}}})
    def preview_png(study_key: str, n: int,
                    size: Annotated[int, Query(ge=64, le=1024)] = 512) -> Response:
        """Preview ``n`` of ``/api/studies/{study_key}/previews`` as PNG, drawn from the
        node's own result files and spool (longer side at most ``size`` pixels)."""
        uid = study_uid(study_key)
        try:
            data = previews.png(uid, n, size)
        except PreviewUnavailable as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc
        return Response(data, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=300"})

    return router
