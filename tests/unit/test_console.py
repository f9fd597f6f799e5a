"""The web console's routes: static pages with a strict CSP, assets, and result previews
drawn from the node's own result files and spool (a real SEG over a real spooled CT)."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.helpers.dicom_results import (
    algorithm_info,
    blob_mask,
    detector_result,
    hemorrhage_finding,
    load_volume,
    write_head_ct,
)
from tests.unit.test_api import AUTH, make_node
from triage_node.api.app import create_app
from triage_node.api.console import PAGES, STATIC
from triage_node.node import Node
from triage_node.results import encode_results
from triage_node.spool.index import Source

PAGE_URLS = ["/console/", "/console/studies/abc123", "/console/rules", "/console/detectors",
             "/console/system"]


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    built = make_node(tmp_path, monkeypatch)
    yield built
    built.db.close()


@pytest.fixture
def client(node: Node) -> Iterator[TestClient]:
    with TestClient(create_app(node)) as c:
        yield c


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text += data


@pytest.mark.parametrize("url", PAGE_URLS)
def test_pages_are_static_with_a_strict_policy(client: TestClient, url: str) -> None:
    r = client.get(url)  # no token: a page holds no data
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    parser = _Tags()
    parser.feed(r.text)
    scripts = [a for t, a in parser.tags if t == "script"]
    assert scripts and all((a.get("src") or "").startswith("/console/assets/") for a in scripts)
    assert parser.script_text.strip() == ""  # no inline script
    for _, attrs in parser.tags:  # no inline style or handler (the CSP would block them)
        assert "style" not in attrs
        assert not [k for k in attrs if k.startswith("on")]
    # Every referenced asset is served, with the policy too.
    for ref in [a.get("src") or a.get("href") for t, a in parser.tags if t in ("script", "link")]:
        assert ref is not None
        asset = client.get(ref)
        assert asset.status_code == 200, ref
        assert asset.headers["x-frame-options"] == "DENY"


def test_console_redirects_to_the_worklist(client: TestClient) -> None:
    r = client.get("/console", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "/console/"


def test_assets_are_an_allow_list(client: TestClient) -> None:
    assert client.get("/console/assets/common.js").headers["content-type"].startswith(
        "text/javascript")
    assert client.get("/console/assets/console.css").headers["content-type"].startswith(
        "text/css")
    for name in ("..%2Fconsole.py", "..%2F..%2Fapi%2Fapp.py", "nope.js", "%2Fetc%2Fpasswd"):
        assert client.get(f"/console/assets/{name}").status_code == 404


def test_static_files_load_nothing_from_elsewhere() -> None:
    """Offline hospitals: no CDN, no web font, no absolute URL; no innerHTML (XSS)."""
    files = [p for p in STATIC.iterdir() if p.is_file()]
    assert {p.name for p in files} >= set(PAGES.values()) | {"common.js", "console.css"}
    for path in files:
        text = path.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name
        assert not re.search(r"https?://", text), path.name
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|eval\(", text), path.name
        assert "@import" not in text, path.name
        for module in re.findall(r'from "([^"]+)"', text):
            assert module.startswith("/console/assets/"), (path.name, module)
            assert (STATIC / module.rsplit("/", 1)[1]).is_file(), module


def test_previews_need_a_token_and_a_known_study(client: TestClient) -> None:
    assert client.get("/api/studies/x/previews").status_code == 401
    assert client.get("/api/studies/x/preview/0.png").status_code == 401
    assert client.get("/api/studies/unknown/previews", headers=AUTH).status_code == 404
    assert client.get("/api/studies/unknown/preview/0.png", headers=AUTH).status_code == 404


def _study_with_seg(node: Node, tmp_path: Path) -> tuple[str, str]:
    """A head CT received into the node's spool and its SEG/SR/KO in the results folder and
    outbox, as the pipeline leaves them. Returns (study key, study UID)."""
    paths = write_head_ct(tmp_path / "ct", shape=(16, 96, 96))
    for path in paths:
        outcome = node.ingestor.ingest(path.read_bytes(), Source(calling_ae="PACS"))
        assert outcome.in_spool
    volume = load_volume(paths)
    mask = blob_mask(volume.shape, (8, 48, 40), (2, 10, 8))
    datasets = encode_results(volume, detector_result([hemorrhage_finding(mask, volume)]),
                              algorithm_info())
    uid = str(datasets[0].StudyInstanceUID)
    key = node.keys.study_key(uid)
    folder = node.results_root / key
    folder.mkdir(parents=True)
    now = time.time()
    with node.db.transaction() as conn:
        for ds in datasets:
            name = f"{ds.Modality}.dcm"
            ds.save_as(folder / name, enforce_file_format=True)
            for destination in ("orthanc", "pacs"):  # one object, two destinations
                conn.execute(
                    "INSERT INTO outbox (study_uid, destination, sop_instance_uid, kind, path,"
                    " status, next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, 'pending',"
                    " ?, ?)", (uid, destination, str(ds.SOPInstanceUID), str(ds.Modality),
                               f"{key}/{name}", now, now))
    return key, uid


def test_seg_preview_is_drawn_on_the_key_slice(client: TestClient, node: Node,
                                               tmp_path: Path) -> None:
    key, _ = _study_with_seg(node, tmp_path)
    listed = client.get(f"/api/studies/{key}/previews", headers=AUTH)
    assert listed.status_code == 200
    (preview,) = listed.json()  # SR and KO have no picture; two destinations, one SEG
    assert preview["kind"] == "SEG" and preview["labels"] == ["hemorrhage"]
    assert preview["url"] == f"/api/studies/{key}/preview/0.png"
    assert "hemorrhage" in preview["caption"]

    r = client.get(preview["url"], headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    rgb = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=int)
    assert rgb.shape == (96, 96, 3)  # never enlarged
    red = (rgb[..., 0] - rgb[..., 2]) > 100
    assert red.any()  # the segment is tinted and outlined
    rows, cols = np.nonzero(red)
    # the blob's centre (row 48, column 40) is inside the outlined region
    assert rows.min() <= 48 <= rows.max() and cols.min() <= 40 <= cols.max()
    small = client.get(preview["url"], params={"size": 64}, headers=AUTH)
    assert max(Image.open(io.BytesIO(small.content)).size) == 64
    assert client.get(f"/api/studies/{key}/preview/1.png", headers=AUTH).status_code == 404


def test_seg_preview_without_its_source_slices_is_a_404(client: TestClient, node: Node,
                                                        tmp_path: Path) -> None:
    key, uid = _study_with_seg(node, tmp_path)
    for row in node.db.query("SELECT path FROM instances WHERE study_uid=?", (uid,)):
        (node.spool.root / row["path"]).unlink()  # as retention would
    r = client.get(f"/api/studies/{key}/preview/0.png", headers=AUTH)
    assert r.status_code == 404 and "spool" in r.json()["detail"]
