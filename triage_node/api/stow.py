"""DICOMweb STOW-RS: ``POST /dicomweb/studies`` (PS3.18 10.5), into the same ingest path as C-STORE.

Each part of the multipart/related body is one Part 10 instance; every part is spooled durably
before the response is sent. The response is the PS3.18 Store Instances Response: a DICOM JSON
data set with Referenced SOP Sequence (0008,1199) for stored instances and Failed SOP Sequence
(0008,1198) with a Failure Reason (0008,1197) for refused ones; HTTP 200 when all were stored,
202 when some were refused or quarantined, 409 when none was stored.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException, Request, Response, status

from triage_node.errors import InvalidDicomError
from triage_node.receive.ingest import Ingestor, IngestOutcome, IngestStatus
from triage_node.receive.multipart import parse_multipart_related
from triage_node.spool.index import Source

# PS3.18 Table I.2-1 / PS3.4 Annex B failure reasons.
_FAILURE_REASON = {
    IngestStatus.UNREADABLE: 0xC000,    # cannot understand
    IngestStatus.NO_SPACE: 0xA700,      # out of resources
    IngestStatus.WRITE_FAILED: 0x0110,  # processing failure
}
_WARNING_QUARANTINED = 0xB007  # data set does not match SOP class (kept, not processed)


def _ui(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _item(outcome: IngestOutcome) -> dict[str, Any]:
    return {"00081150": _ui(outcome.sop_class_uid), "00081155": _ui(outcome.sop_instance_uid)}


def stow_response(outcomes: list[IngestOutcome]) -> tuple[int, dict[str, Any]]:
    referenced, failed = [], []
    warned = False
    for outcome in outcomes:
        if outcome.in_spool:
            referenced.append(_item(outcome))
        elif outcome.status is IngestStatus.QUARANTINED:
            warned = True
            referenced.append({**_item(outcome),
                               "00081196": {"vr": "US", "Value": [_WARNING_QUARANTINED]}})
        else:
            failed.append({**_item(outcome),
                           "00081197": {"vr": "US", "Value": [_FAILURE_REASON[outcome.status]]}})
    body: dict[str, Any] = {}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if not referenced:
        return status.HTTP_409_CONFLICT, body
    if failed or warned:
        return status.HTTP_202_ACCEPTED, body
    return status.HTTP_200_OK, body


async def store_instances(request: Request, ingestor: Ingestor, called_ae: str) -> Response:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/related"):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            detail='expected multipart/related; type="application/dicom"')
    try:
        parts = parse_multipart_related(await request.body(), content_type)
    except InvalidDicomError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(exc)) from exc
    if not parts:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="no parts in the request")
    for i, part in enumerate(parts):
        if part.content_type not in ("application/dicom", ""):
            raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                                detail=f"part {i + 1} is {part.content_type}; only "
                                       "application/dicom instances are accepted")
    source = Source(calling_ae="STOW-RS", called_ae=called_ae,
                    host=request.client.host if request.client else "")
    outcomes = [ingestor.ingest(part.body, source) for part in parts]
    code, body = stow_response(outcomes)
    return Response(content=json.dumps(body), status_code=code,
                    media_type="application/dicom+json")
