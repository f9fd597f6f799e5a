"""The web console in headless Chromium (Debian ``chromium`` driven by Playwright).

Real parts throughout: Orthanc, ``triage-node serve``, DCMTK ``storescu`` sending a head CT
with a bleed and a normal one, and the browser signing in with bearer tokens of three users
(an admin, two radiologists). A screenshot of each page is saved: to a temporary folder, or
to ``$TRIAGE_NODE_SCREENSHOTS`` (``TRIAGE_NODE_SCREENSHOTS=docs/img`` refreshes the ones in
docs/console.md).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from deploy.demo.node import REPO, NodeProcess, write_node_config
from deploy.demo.orthanc import LocalOrthanc
from deploy.demo.senders import storescu
from deploy.demo.studies import make_study

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
GRID = (48, 256, 256)
SPACING = (3.0, 0.9, 0.9)
VIEWPORT = {"width": 1100, "height": 720}
CRITICAL_RED = "rgb(179, 38, 30)"  # --critical in console.css
NEGATIVE_GREEN = "rgb(30, 123, 58)"  # --negative


@dataclass
class Site:
    node: NodeProcess
    orthanc: LocalOrthanc
    admin: str
    dr_a: str
    dr_b: str
    bleed_key: str
    normal_key: str
    bleed_uid: str
    shots: Path


@pytest.fixture(scope="module")
def site(orthanc: LocalOrthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not CHROMIUM.exists():
        pytest.fail("/usr/bin/chromium is not installed: run `make install`")
    folder = tmp_path_factory.mktemp("console-node")
    config = write_node_config(
        folder, assembly__series_quiet_seconds=1, assembly__study_quiet_seconds=1,
        delivery__retry_initial_seconds=0.5, delivery__retry_max_seconds=2,
        api__tokens=[{"user": "dr-a", "role": "radiologist", "token_env": "TN_TOKEN_DR_A"},
                     {"user": "dr-b", "role": "radiologist", "token_env": "TN_TOKEN_DR_B"}])
    dr_a, dr_b = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    node = NodeProcess(folder / "data", orthanc, config=config,
                       extra_env={"TN_TOKEN_DR_A": dr_a, "TN_TOKEN_DR_B": dr_b}).start()
    try:
        out = tmp_path_factory.mktemp("console-studies")
        bleed = make_study("bleed", out, seed=9001, bleed_ml=20.0, grid=GRID, spacing=SPACING,
                           bleed_kind="intraparenchymal")
        normal = make_study("normal", out, seed=9002, bleed_ml=None, grid=GRID,
                            spacing=SPACING, patient_name="DEMO^NORMAL",
                            patient_id="DEMO-0002", accession_number="DEMOACC0002")
        for study in (bleed, normal):
            storescu(study.folder, orthanc.dicom_port, called_aet="ORTHANC")
            storescu(study.folder, node.dicom_port)
        bleed_item = node.wait_for_study(bleed.study_instance_uid, statuses=("delivered",))
        normal_item = node.wait_for_study(normal.study_instance_uid)
        assert bleed_item["tier"] == "critical", bleed_item
        assert normal_item["tier"] == "negative", normal_item
        target = os.environ.get("TRIAGE_NODE_SCREENSHOTS")
        shots = (REPO / target if target else tmp_path_factory.mktemp("console-shots"))
        shots.mkdir(parents=True, exist_ok=True)
        yield Site(node, orthanc, node.token, dr_a, dr_b, bleed_item["study_key"],
                   normal_item["study_key"], bleed.study_instance_uid, shots)
    finally:
        node.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield launched
        launched.close()


class Tab:
    """A signed-in browser tab that fails the test on a script error or a CSP violation."""

    def __init__(self, browser: Browser, site: Site, token: str, path: str = "/console/"):
        self.context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
        self.page: Page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        self.page.on("console", self._console)
        self.site = site
        self.page.goto(site.node.api_url + path)
        expect(self.page.get_by_role("heading", name="Sign in to triage-node")).to_be_visible()
        self.page.get_by_label("API token").fill(token)
        self.page.get_by_role("button", name="Sign in").click()
        expect(self.page.locator("#who")).to_be_visible()

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.problems.append(f"console error: {message.text}")

    def shot(self, name: str, *, full_page: bool = False) -> Path:
        path = self.site.shots / f"console-{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        # A 256-colour palette keeps text sharp and the files small enough for the docs.
        with Image.open(path) as shot:
            small = shot.convert("RGB").quantize(256, dither=Image.Dither.NONE)
        small.save(path, optimize=True)
        assert path.stat().st_size <= 200_000, f"{path.name} is {path.stat().st_size} bytes"
        return path

    def close(self) -> None:
        self.context.close()
        assert not self.problems, self.problems


def _row(page: Page, key: str) -> Any:
    return page.locator(f'#rows tr[data-study-key="{key}"]')


def test_worklist_orders_colours_and_updates_live(browser: Browser, site: Site) -> None:
    a = Tab(browser, site, site.dr_a)
    b = Tab(browser, site, site.dr_b)
    for tab in (a, b):
        expect(tab.page.locator("#who-user")).to_have_text("dr-a" if tab is a else "dr-b")
        expect(tab.page.locator("#who-role")).to_have_text("radiologist")
        expect(tab.page.locator("#live")).to_have_text("Live updates: on")
        # admin-only navigation is hidden from radiologists
        expect(tab.page.get_by_role("link", name="System")).to_be_hidden()
    rows = a.page.locator("#rows tr")
    expect(rows).to_have_count(2)
    first, second = rows.nth(0), rows.nth(1)
    expect(first).to_have_attribute("data-study-key", site.bleed_key)
    expect(first).to_have_attribute("data-tier", "critical")
    expect(first.locator(".tier")).to_have_text("Critical")  # text, not colour alone
    expect(first.locator(".tier")).to_have_css("color", CRITICAL_RED)
    expect(first).to_have_css("border-left-color", CRITICAL_RED)
    expect(second).to_have_attribute("data-tier", "negative")
    expect(second.locator(".tier")).to_have_text("Negative")
    expect(second.locator(".tier")).to_have_css("color", NEGATIVE_GREEN)
    expect(first.locator(".result")).to_contain_text("hemorrhage")
    assert site.bleed_uid not in a.page.content()  # the table shows keys, not UIDs

    # dr-a claims in one tab; dr-b's tab gets it over SSE, without reloading.
    b.page.evaluate("window.__sameDocument = true")
    _row(a.page, site.bleed_key).get_by_role("button", name="Claim").click()
    expect(_row(a.page, site.bleed_key).locator(".claimed")).to_have_text("dr-a")
    expect(_row(b.page, site.bleed_key).locator(".claimed")).to_have_text("dr-a", timeout=10_000)
    expect(_row(b.page, site.bleed_key).get_by_role("button", name="Claim")).to_have_count(0)
    # dr-b may not mark a study read that dr-a holds
    expect(_row(b.page, site.bleed_key).get_by_role("button", name="Mark read")).to_be_disabled()

    _row(a.page, site.bleed_key).get_by_role("button", name="Mark read").click()
    expect(_row(a.page, site.bleed_key).locator(".read")).to_contain_text("dr-a")
    expect(_row(b.page, site.bleed_key).locator(".read")).to_contain_text("dr-a", timeout=10_000)
    assert b.page.evaluate("window.__sameDocument") is True  # updated in place, no reload
    a.shot("worklist")

    # What the browser showed is what the node recorded.
    item = httpx.get(f"{site.node.api_url}/api/worklist/{site.bleed_key}", timeout=10,
                     headers={"Authorization": f"Bearer {site.admin}"}).json()
    assert item["claimed_by"] == "dr-a" and item["read_by"] == "dr-a"
    _row(a.page, site.bleed_key).get_by_role("button", name="Release").click()
    expect(_row(b.page, site.bleed_key).locator(".claimed")).to_have_text("—", timeout=10_000)
    a.close()
    b.close()


def test_worklist_pages(browser: Browser, site: Site) -> None:
    a = Tab(browser, site, site.dr_a, "/console/?per_page=1")
    page = a.page
    expect(page.locator("#per-page")).to_have_value("1")
    expect(page.locator("#rows tr")).to_have_count(1)
    expect(_row(page, site.bleed_key)).to_be_visible()  # worklist order: critical first
    expect(page.locator("#count")).to_have_text("Studies 1–1 of 2")
    previous = page.get_by_role("button", name="Previous page")
    following = page.get_by_role("button", name="Next page")
    expect(previous).to_be_disabled()
    following.click()
    expect(_row(page, site.normal_key)).to_be_visible()
    expect(page.locator("#rows tr")).to_have_count(1)
    expect(page.locator("#count")).to_have_text("Studies 2–2 of 2")
    expect(following).to_be_disabled()
    previous.click()
    expect(_row(page, site.bleed_key)).to_be_visible()
    # a filter starts again from the first page
    following.click()
    expect(page.locator("#count")).to_have_text("Studies 2–2 of 2")
    page.locator("#filter-tier").select_option("negative")
    expect(page.locator("#count")).to_have_text("Studies 1–1 of 1")
    expect(_row(page, site.normal_key)).to_be_visible()
    page.locator("#filter-tier").select_option("")
    page.locator("#per-page").select_option("25")
    expect(page.locator("#rows tr")).to_have_count(2)
    expect(page.locator("#count")).to_have_text("Studies 1–2 of 2")
    expect(previous).to_be_disabled()
    expect(following).to_be_disabled()
    a.close()


def test_study_page_timeline_findings_feedback_pictures(browser: Browser, site: Site) -> None:
    a = Tab(browser, site, site.dr_a)
    _row(a.page, site.bleed_key).get_by_role("link", name="Open").click()
    page = a.page
    assert page.url == f"{site.node.api_url}/console/studies/{site.bleed_key}"
    expect(page.locator("#title")).to_have_text(f"Study {site.bleed_key}")
    expect(page.locator("#tier .tier")).to_have_text("Critical")
    stages = page.locator("#timeline li .stage")
    expect(stages).to_have_text(["Received", "Last instance", "Complete", "Inferred",
                                 "Delivered", "Flagged"])
    expect(page.locator("#timeline li.missing")).to_have_count(0)  # every stage happened
    expect(page.locator("#legend")).to_contain_text("Received to delivered")
    expect(page.locator("#bars span").first).to_be_visible()

    finding = page.locator('#findings tr[data-finding="0"]')
    expect(finding).to_contain_text("hemorrhage")
    expect(finding).to_contain_text("mL")
    finding.get_by_role("button", name="Agree with hemorrhage (finding 1)", exact=True).click()
    feedback = page.locator("#feedback tbody tr")
    expect(feedback.first).to_contain_text("agree")
    finding.get_by_role("button", name="Comment on hemorrhage (finding 1)", exact=True).click()
    finding.get_by_role("textbox", name="Comment on hemorrhage (finding 1)").fill(
        "margin looks right")
    finding.get_by_role("button", name="Send comment").click()
    expect(feedback).to_have_count(2)
    expect(page.locator("#feedback")).to_contain_text("margin looks right")

    image = page.locator("#pictures img[data-preview]").first
    expect(image).to_be_visible()
    page.wait_for_function(
        "() => { const i = document.querySelector('#pictures img'); "
        "return i && i.complete && i.naturalWidth > 0; }", timeout=20_000)
    assert image.evaluate("i => i.naturalWidth") > 0
    assert (image.get_attribute("src") or "").startswith("blob:")  # fetched with the token
    expect(page.locator("#pictures figcaption").first).to_contain_text("hemorrhage")

    links = page.locator("#results a.orthanc-link")
    expect(links.first).to_be_visible()
    hrefs = [links.nth(i).get_attribute("href") or "" for i in range(links.count())]
    assert hrefs and all(h.startswith(f"{site.orthanc.url}/app/explorer.html#instance?uuid=")
                         for h in hrefs)
    with site.orthanc.client() as orthanc:  # each link names an instance Orthanc holds
        for href in hrefs:
            assert orthanc.get(f"/instances/{href.rsplit('=', 1)[1]}").status_code == 200
    assert site.bleed_uid not in page.url
    a.shot("study", full_page=True)

    stored = httpx.get(f"{site.node.api_url}/api/studies/{site.bleed_key}/feedback",
                       headers={"Authorization": f"Bearer {site.dr_a}"}, timeout=10).json()
    assert [(f["verdict"], f["user"], f["finding_index"]) for f in stored] == [
        ("agree", "dr-a", 0), ("comment", "dr-a", 0)]
    a.close()


def test_rules_detectors_and_system_pages_for_an_admin(browser: Browser, site: Site) -> None:
    admin = Tab(browser, site, site.admin, "/console/rules")
    page = admin.page
    expect(page.locator("#who-role")).to_have_text("admin")
    rule = page.locator('#rules tr[data-rule="head-ct-hemorrhage"]')
    expect(rule).to_contain_text("ct-head-hemorrhage")
    expect(rule.locator(".matches")).to_have_text("2")
    reload = page.get_by_role("button", name="Reload rules file")
    expect(reload).to_be_visible()
    reload.click()
    expect(page.locator("#status")).to_contain_text("Rules reloaded")
    expect(reload).to_be_enabled()
    admin.shot("rules")

    page.get_by_role("link", name="Detectors").click()
    card = page.locator('article[data-detector="ct-head-hemorrhage"]')
    expect(card).to_contain_text("segmentation")
    expect(card).to_contain_text("Held-out evaluation")
    expect(card.locator(".agreement")).to_contain_text("1 agree")  # dr-a's vote above
    admin.shot("detectors")

    page.get_by_role("link", name="System").click()
    expect(page.get_by_role("region", name="Queue")).to_be_visible()
    outbox = page.get_by_role("region", name="Outbox")
    expect(outbox.locator("tr", has_text="delivered")).not_to_contain_text(" 0")
    expect(page.get_by_role("region", name="Worklist")).to_contain_text("Critical")
    expect(page.get_by_role("region", name="Throughput, last hour")).to_contain_text(
        "2 studies")
    admin.shot("system")
    admin.close()


def test_a_radiologist_sees_no_admin_actions(browser: Browser, site: Site) -> None:
    tab = Tab(browser, site, site.dr_b, "/console/rules")
    expect(tab.page.locator('#rules tr[data-rule="head-ct-hemorrhage"]')).to_be_visible()
    expect(tab.page.get_by_role("button", name="Reload rules file")).to_have_count(0)
    tab.page.goto(f"{site.node.api_url}/console/system")
    # the token lives in this tab's session storage: no second sign-in
    expect(tab.page.locator("#cards")).to_contain_text("needs the admin role")
    tab.page.goto(f"{site.node.api_url}/console/studies/{site.bleed_key}")
    expect(tab.page.locator("#actions")).not_to_contain_text("Re-run")
    tab.page.get_by_role("button", name="Sign out").click()
    expect(tab.page.get_by_label("API token")).to_be_visible()
    tab.close()
