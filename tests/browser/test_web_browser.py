"""The reading page in a real browser: Debian's chromium driven by Playwright, headless, against a
live server on a loopback port with the bundled model and its image gate (the real model answers).

Every test fails on a console error, a failed request or an HTTP error it did not expect; an
axe-core scan (tests/browser/node_modules, `npm ci` in scripts/test) must find no serious or
critical violation. Screenshots: `CXR_WRITE_SCREENSHOTS=1` writes docs/screenshots/*.png
(scripts/screenshots); otherwise they go to a temp folder and are only checked for size.
Skips cleanly without chromium, Playwright, the bundled weights or the shared data.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from live_server import make_test_app, run_live_server

playwright_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CXR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
AXE = Path(__file__).resolve().parent / "node_modules" / "axe-core" / "axe.min.js"
SHOTS = REPO / "docs" / "screenshots"
TIMEOUT_MS = 60_000  # two shared CPU cores: an analysis with heatmaps can take seconds

if not Path(CHROMIUM).exists():
    pytest.skip(f"chromium not found at {CHROMIUM}", allow_module_level=True)


@dataclass
class Films:
    pneumonia: Path  # Kermany full resolution, pediatric pneumonia
    pa: Path  # NIH CXR14, PA
    dicom: Path  # SIIM CR PA as DICOM
    kermany: list[Path] = field(default_factory=list)
    cat: Path | None = None


@pytest.fixture(scope="module")
def films(shared_data: Path) -> Films:
    nih = shared_data / "nih_cxr14_fullres" / "images"
    kermany_full = shared_data / "kermany_fullres" / "images" / "train"
    dicom = shared_data / "dicom"
    kermany_dir = shared_data / "kermany_pneumonia" / "images" / "train"
    normal = sorted((kermany_dir / "NORMAL").glob("*.jpeg"))[:2]
    kermany = [*normal[:1], *sorted((kermany_dir / "PNEUMONIA").glob("*.jpeg"))[:1], *normal[1:]]
    found = Films(
        # a child's film: the bundled model's validated population (an adult film is flagged)
        pneumonia=kermany_full / "PNEUMONIA" / "person1004_bacteria_2935.jpeg",
        pa=nih / "00000773_001.png",
        dicom=dicom / "siim_cr_pa_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
        kermany=kermany,
        cat=dicom / "feline_dx_chest_ap_deid_data.dcm",
    )
    missing = [p for p in (found.pneumonia, found.pa, found.dicom, found.cat, *kermany) if not p.exists()]
    if missing or len(kermany) < 3:
        pytest.skip(f"shared films missing: {missing or 'kermany'}")
    return found


def _bundled_available() -> bool:
    from ml.errors import ModelUnavailable
    from ml.models.bundled import load_bundled

    try:
        load_bundled()
    except ModelUnavailable:
        return False
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not _bundled_available():
        pytest.skip("bundled model weights not installed")
    app = make_test_app(
        tmp_path_factory.mktemp("cxr-browser"), model="cxr:pneumonia-v1", ood_gate=True, engine="torch",
        max_upload_bytes=64 * 1024 * 1024,
    )
    with run_live_server(app, startup_timeout=180) as live:
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


class Watch:
    """Console errors, failed requests and HTTP errors of one page; `expect` allows known ones."""

    def __init__(self, page: Any) -> None:
        self.problems: list[str] = []
        self.allowed: list[tuple[int, str]] = []
        self.seen_allowed: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.method} {r.url} {r.failure}"))
        page.on("response", self._response)

    def expect(self, status: int, url_part: str) -> None:
        self.allowed.append((status, url_part))

    def _ok(self, status: int, url: str) -> bool:
        return any(status == s and part in url for s, part in self.allowed)

    def _response(self, r: Any) -> None:
        if r.status >= 400:
            if self._ok(r.status, r.url):
                self.seen_allowed.append(f"{r.status} {r.url}")
            else:
                self.problems.append(f"HTTP {r.status} {r.request.method} {r.url}")

    def _console(self, msg: Any) -> None:
        if msg.type != "error":
            return
        # chromium logs every 4xx answer as "Failed to load resource"; the expected ones are fine
        status = re.search(r"status of (\d{3})", msg.text)
        url = (msg.location or {}).get("url", "")
        if status and self._ok(int(status.group(1)), url):
            return
        self.problems.append(f"console error: {msg.text} at {url}")


@pytest.fixture
def page(browser: Any, server: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=server.root)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.watch = Watch(pg)
    yield pg
    problems = pg.watch.problems
    context.close()
    assert not problems, "\n".join(problems)


def open_page(page: Any, hash_: str = "") -> None:
    page.goto("/" + hash_)
    page.wait_for_selector("body[data-ready=true]")


def wait_viewer(page: Any) -> None:
    page.wait_for_selector("#viewer-view[data-ready=true]")
    page.wait_for_selector("#film[data-loaded]")


def canvas_signature(page: Any) -> list[int]:
    """A coarse pixel summary of the film canvas (sums over an 8x8 grid of R, G, B)."""
    return page.evaluate(
        """() => {
          const c = document.getElementById('film');
          const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          const out = new Array(8 * 8 * 3).fill(0);
          for (let y = 0; y < c.height; y += 2) for (let x = 0; x < c.width; x += 2) {
            const i = (y * c.width + x) * 4, cell = (Math.floor(y * 8 / c.height) * 8 + Math.floor(x * 8 / c.width)) * 3;
            out[cell] += d[i]; out[cell + 1] += d[i + 1]; out[cell + 2] += d[i + 2];
          }
          return out;
        }"""
    )


def redness(sig: list[int]) -> int:
    return sum(max(0, sig[i] - sig[i + 2]) + abs(sig[i] - sig[i + 1]) for i in range(0, len(sig), 3))


def upload(page: Any, *paths: Path, name: str = "", ident: str = "") -> None:
    if name:
        page.fill("#u-name", name)
    if ident:
        page.fill("#u-id", ident)
    page.set_input_files("#file", [str(p) for p in paths])


def shot(page: Any, name: str, tmp_path: Path) -> Path:
    folder = SHOTS if os.environ.get("CXR_WRITE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path))
    assert path.stat().st_size > 20_000  # a real rendering, not a blank page
    return path


def axe_violations(page: Any) -> list[str]:
    if not AXE.exists():
        pytest.skip("axe-core not installed (cd tests/browser && npm ci)")
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
    return [
        f"{v['id']} ({v['impact']}): {v['help']} -> {[n['target'] for n in v['nodes']][:3]}"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]


# ------------------------------------------------------------------------------------ tests


def test_upload_real_film_fills_findings_and_heatmap_changes_the_canvas(page, films, tmp_path):
    open_page(page)
    upload(page, films.pneumonia, name="Ada Lovelace", ident="KER-1004")
    page.wait_for_url(re.compile(r"#/report/"))
    wait_viewer(page)
    rows = page.locator("#findings-body tr")
    assert rows.count() >= 1
    assert "Pneumonia" in page.locator("#findings-body").inner_text()
    first = rows.first.locator("td")
    assert re.match(r"\d+\.\d %", first.nth(0).inner_text().strip().split()[-2] + " %")
    assert "%" in first.nth(1).inner_text()  # operating point
    assert page.locator("#v-model").inner_text().startswith("cxr:pneumonia-v1")
    assert "not a diagnosis" in page.locator(".banner").inner_text()
    assert "Ada Lovelace" in page.locator("#v-patient").inner_text()
    report = page.locator("#report-text").inner_text()
    assert "Impression:" in report and "cxr:pneumonia-v1" in report

    page.select_option("#heat-finding", "pneumonia")
    page.wait_for_timeout(300)
    with_heat = canvas_signature(page)
    page.uncheck("#heat-on")
    without = canvas_signature(page)
    assert with_heat != without and redness(with_heat) > redness(without)  # the colour map went away
    page.check("#heat-on")
    page.fill("#heat-opacity", "100")
    page.dispatch_event("#heat-opacity", "input")
    assert redness(canvas_signature(page)) > redness(with_heat)  # more opaque: more colour

    page.check("input[value=lung]")
    page.wait_for_selector("#film[data-loaded=lung]")
    page.uncheck("#heat-on")
    lung = canvas_signature(page)
    assert lung != without  # the server rendered another window
    assert "lung" in page.locator("#wl-readout").inner_text()

    box = page.locator("#film").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down(button="right")  # right-drag: window (horizontal) and level (vertical)
    page.mouse.move(box["x"] + box["width"] / 2 - 120, box["y"] + box["height"] / 2 + 60, steps=6)
    page.mouse.up(button="right")
    page.wait_for_selector("#film[data-loaded=manual]")
    page.wait_for_timeout(500)
    assert canvas_signature(page) != lung and "(manual)" in page.locator("#wl-readout").inner_text()

    page.click("#zoom-in")
    assert page.locator("#zoom-level").inner_text() == "125 %"
    page.click("#zoom-fit")

    header = page.locator("#findings th[data-key=probability]")
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "descending"
    values = [float(t.split()[0]) for t in page.locator("#findings-body tr td:nth-child(2)").all_inner_texts()]
    assert values == sorted(values, reverse=True)
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "ascending"

    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click("#copy-report")
    playwright_api.expect(page.locator("#copy-status")).to_have_text("Report text copied.")
    assert page.evaluate("() => navigator.clipboard.readText()") == report

    page.locator("#fhir-links li button").first.click()
    page.wait_for_function("() => document.getElementById('json-body').textContent.includes('DiagnosticReport')")
    assert '"status": "preliminary"' in page.locator("#json-body").inner_text()
    page.click("#json-close")


def test_worklist_lists_filters_and_opens_reports(page, films):
    open_page(page)
    upload(page, films.pa, name="Grace Hopper", ident="NIH-773")
    page.wait_for_url(re.compile(r"#/report/"))
    wait_viewer(page)
    page.click("a.button:has-text('Worklist')")
    page.wait_for_selector("#wl-body tr[data-id]")
    text = page.locator("#wl-body").inner_text()
    assert "Grace Hopper" in text and "Upload" in text and "cxr:pneumonia-v1" in text

    page.fill("#f-name", "hopper")
    page.click("#filters button[type=submit]")
    page.wait_for_function("() => [...document.querySelectorAll('#wl-body tr[data-id]')].length > 0 && "
                           "!document.getElementById('wl-body').innerText.includes('Lovelace')")
    rows = page.locator("#wl-body tr[data-id]")
    assert all("Grace Hopper" in t for t in rows.all_inner_texts())

    page.fill("#f-name", "")
    page.fill("#f-id", "KER-1004")
    page.click("#filters button[type=submit]")
    page.wait_for_function("() => !document.getElementById('wl-body').innerText.includes('Hopper')")
    assert all("KER-1004" in t for t in page.locator("#wl-body tr[data-id]").all_inner_texts())

    page.click("#filters button[type=reset]")
    page.select_option("#f-triage", "urgent")
    # the filtered list replaces the reset one when its search returns: wait for it, then check it
    page.wait_for_function("() => { const rows = [...document.querySelectorAll('#wl-body tr[data-id]')];"
                           " return rows.length > 0 && rows.every((r) => r.innerText.toUpperCase().includes('URGENT')); }")
    for t in page.locator("#wl-body tr[data-id]").all_inner_texts():
        assert "URGENT" in t.upper()
    assert "Grace Hopper" not in page.locator("#wl-body").inner_text()  # an adult film: never urgent
    page.select_option("#f-triage", "")
    page.wait_for_function("() => document.querySelectorAll('#wl-body tr[data-id]').length >= 2")

    page.locator("#wl-body tr[data-id] a", has_text="Grace Hopper").first.click()
    wait_viewer(page)
    assert "Grace Hopper" in page.locator("#v-patient").inner_text()
    assert page.locator("#findings-body tr").count() >= 1


def test_worklist_updates_without_reload(page, films, server):
    open_page(page)
    page.wait_for_selector("#wl-body tr")
    before = page.locator("#wl-body tr[data-id]").count()
    _post_film(server, films.dicom)
    page.wait_for_function(f"() => document.querySelectorAll('#wl-body tr[data-id]').length > {before}", timeout=20_000)
    assert "FHIR" in page.locator("#wl-body tr.new").first.inner_text()  # posted by a FHIR client, not the page
    assert "new result" in page.locator("#wl-live").inner_text()


def _post_film(server: Any, film: Path, identifier: str | None = None) -> None:
    import base64

    import httpx

    media: dict[str, Any] = {"resourceType": "Media", "status": "completed",
                             "content": {"contentType": "application/dicom", "data": base64.b64encode(film.read_bytes()).decode()}}
    if identifier:
        media["identifier"] = [{"system": "urn:test:media", "value": identifier}]
    r = httpx.post(f"{server.fhir_base}/Media/$analyze", timeout=120,
                   json={"resourceType": "Parameters", "parameter": [{"name": "media", "resource": media}]})
    assert r.status_code in (200, 201), r.text


def test_worklist_pages_through_older_results(page, server, films):
    for i in range(3):  # enough for two pages of two, whichever tests ran before
        _post_film(server, films.dicom, f"paging-{i}")
    page.goto("/?page_size=2")
    page.wait_for_selector("body[data-ready=true]")
    rows = page.locator("#wl-body tr[data-id]")
    first = [rows.nth(i).get_attribute("data-id") for i in range(rows.count())]
    assert len(first) == 2 and page.is_disabled("#wl-prev") and not page.is_disabled("#wl-next")
    page.click("#wl-next")
    page.wait_for_function("(ids) => ![...document.querySelectorAll('#wl-body tr[data-id]')]"
                           ".some((r) => ids.includes(r.dataset.id))", arg=first)
    second = [rows.nth(i).get_attribute("data-id") for i in range(rows.count())]
    assert second and not set(second) & set(first) and not page.is_disabled("#wl-prev")
    page.click("#wl-prev")
    page.wait_for_function("(ids) => [...document.querySelectorAll('#wl-body tr[data-id]')]"
                           ".map((r) => r.dataset.id).join() === ids.join()", arg=first)


def test_cat_radiograph_is_refused_with_a_clear_message(page, films):
    page.watch.expect(422, "/fhir/Media/$analyze")
    open_page(page)
    upload(page, films.cat)
    item = page.locator(".upload-item.failed")
    item.wait_for()
    message = item.locator(".u-status").inner_text()
    assert message.startswith("Refused: this does not look like a frontal chest radiograph.")
    assert "422" not in message and "Traceback" not in message
    assert item.locator("progress").get_attribute("value") == "100"

    page.select_option("#f-status", "rejected")
    page.wait_for_selector("#wl-body tr.refused")
    assert "REFUSED" in page.locator("#wl-body tr.refused").first.inner_text().upper()
    page.locator("#wl-body tr.refused a").first.click()
    page.wait_for_selector("#viewer-view[data-ready=true]")
    assert not page.locator("#v-refusal").is_hidden()
    assert "image gate refused" in page.locator("#v-refusal-title").inner_text()
    page.wait_for_selector("#film[data-loaded]")  # the refused film itself is shown (16-bit DX, windowed)


def test_three_files_at_once_each_with_its_own_progress(page, films):
    open_page(page)
    upload(page, *films.kermany)
    page.wait_for_function("() => document.querySelectorAll('.upload-item.done, .upload-item.failed').length === 3",
                           timeout=TIMEOUT_MS * 3)
    items = page.locator(".upload-item")
    assert items.count() == 3
    names = items.locator(".u-file").all_inner_texts()
    assert names == [p.name for p in films.kermany]
    for i in range(3):
        assert items.nth(i).locator("progress").get_attribute("value") == "100"
        assert "Open report" in items.nth(i).inner_text()
    assert "#/report/" not in page.url  # several files: stay on the list

    # normal and pneumonia films now sit side by side: the triage filter separates them
    for triage, other in (("routine", "URGENT"), ("urgent", "ROUTINE")):
        page.select_option("#f-triage", triage)
        page.wait_for_function(
            "([t, o]) => { const rows = [...document.querySelectorAll('#wl-body tr[data-id]')];"
            " return rows.length > 0 && rows.every((r) => r.innerText.toUpperCase().includes(t.toUpperCase())"
            " && !r.innerText.toUpperCase().includes(o)); }", arg=[triage, other])


def _tab_to(page: Any, selector: str, limit: int = 80, key: str = "Tab") -> None:
    for _ in range(limit):
        page.keyboard.press(key)
        if page.evaluate("(s) => document.activeElement && document.activeElement.matches(s)", selector):
            outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
            assert outline != "none", f"no visible focus on {selector}"
            return
    raise AssertionError(f"Tab never reached {selector}")


def test_keyboard_only(page, films):
    choosers: list[Any] = []
    page.on("filechooser", lambda chooser: choosers.append(chooser))  # intercept from the start: the OS dialog never opens
    open_page(page)
    _tab_to(page, "#choose")
    page.keyboard.press("Enter")
    page.wait_for_function("() => true")  # let the click reach the file input
    deadline = 50
    while not choosers and deadline:
        page.wait_for_timeout(200)
        deadline -= 1
    assert choosers, "Enter on 'Choose files' did not open the file chooser"
    choosers[0].set_files(str(films.dicom))
    page.wait_for_url(re.compile(r"#/report/"))
    wait_viewer(page)
    _tab_to(page, "#film")
    page.keyboard.press("+")
    assert page.locator("#zoom-level").inner_text() == "125 %"
    page.keyboard.press("0")
    page.keyboard.press("]")  # wider window, from the keyboard
    page.wait_for_selector("#film[data-loaded=manual]")
    before = canvas_signature(page)
    page.keyboard.press("h")
    assert not page.is_checked("#heat-on") and canvas_signature(page) != before
    _tab_to(page, "#findings th[data-key=confidence] button")
    page.keyboard.press("Enter")
    assert page.get_attribute("#findings th[data-key=confidence]", "aria-sort") == "descending"
    _tab_to(page, "#copy-report")
    _tab_to(page, "a.button", key="Shift+Tab", limit=120)
    page.keyboard.press("Enter")
    page.wait_for_selector("#worklist-view:not([hidden])")
    _tab_to(page, "#f-status")
    page.keyboard.press("ArrowDown")  # select: next option, change event fires
    page.wait_for_function("() => document.getElementById('f-status').value === 'rejected'")
    page.wait_for_selector("#wl-body tr")
    page.keyboard.press("ArrowUp")
    page.wait_for_function("() => document.getElementById('f-status').value === ''")
    # the analysed list (rows with a triage) must have replaced the refused one before tabbing into
    # it: a row focused in the old list is gone when the new one arrives
    page.wait_for_function("() => { const rows = [...document.querySelectorAll('#wl-body tr[data-id]')];"
                           " return rows.length > 0 && rows.every((r) => /URGENT|ROUTINE/.test(r.innerText.toUpperCase())); }")
    for attempt in range(3):
        # a report's link: the other tests' refused and failed analyses (Task rows, #/task/) may be
        # listed too once a live update arrives
        _tab_to(page, "#wl-body tr[data-id] a[href^='#/report/']")
        page.keyboard.press("Enter")
        try:  # the 5 s live update may replace the rows between Tab and Enter: tab again then
            page.wait_for_url(re.compile(r"#/report/"), timeout=5_000)
            break
        except Exception:
            if attempt == 2:
                raise
            if "#/report/" not in page.url and "#/task/" in page.url:
                page.go_back()  # Enter landed on a row that changed under it: back to the worklist
                page.wait_for_selector("#worklist-view:not([hidden])")
    wait_viewer(page)


def test_accessibility_has_no_serious_or_critical_violations(page, films):
    open_page(page)
    page.wait_for_selector("#wl-body tr[data-id]")
    assert axe_violations(page) == []
    page.locator("#wl-body tr[data-id] a").first.click()
    wait_viewer(page)
    assert axe_violations(page) == []


def test_screenshots_of_worklist_and_viewer(browser, server, films, tmp_path):
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, base_url=server.root)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    watch = Watch(pg)
    open_page(pg)
    pg.wait_for_selector("#wl-body tr[data-id]")
    shot(pg, "worklist.png", tmp_path)
    pg.locator("#wl-body tr[data-id] a", has_text="Ada Lovelace").first.click()
    wait_viewer(pg)
    pg.select_option("#heat-finding", "pneumonia")
    pg.wait_for_timeout(300)
    shot(pg, "viewer.png", tmp_path)
    context.close()
    assert not watch.problems, watch.problems


# ------------------------------------------------------------------------------------ auth on


TOKEN = "page-test-token"


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from live_server import tiny_test_analyzer

    analyzer = tiny_test_analyzer()
    app = make_test_app(
        tmp_path_factory.mktemp("cxr-browser-auth"), analyzer=analyzer, auth_enabled=True, auth_dev_static_tokens=True,
        auth_tokens={TOKEN: "system/*.read system/*.write"},
    )
    try:
        with run_live_server(app) as live:
            yield live
    finally:
        if analyzer is not None:
            analyzer.close()


def test_auth_token_is_asked_once_and_kept_for_the_tab_only(browser, secured_server, tmp_path):
    import io

    from PIL import Image

    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=secured_server.root)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    watch = Watch(pg)
    watch.expect(401, "/fhir/")
    film = tmp_path / "white.png"
    buf = io.BytesIO()
    Image.new("L", (256, 256), 255).save(buf, "PNG")
    film.write_bytes(buf.getvalue())

    pg.goto("/")
    pg.wait_for_selector("body[data-ready=true]")
    pg.wait_for_selector("#auth[open]")  # the token field opens by itself
    pg.set_input_files("#file", str(film))  # an upload without a token waits for one
    pg.wait_for_selector("#error:not([hidden])")
    assert "access token" in pg.inner_text("#error")
    pg.fill("#token", "wrong")
    pg.press("#token", "Enter")
    pg.wait_for_function("() => document.getElementById('error').innerText.includes('not accepted')")
    assert pg.locator("#auth").get_attribute("open") is not None  # asked again, with the reason
    pg.fill("#token", TOKEN)
    pg.press("#token", "Enter")
    pg.wait_for_url(re.compile(r"#/report/"))  # the waiting upload went on with the token
    wait_viewer(pg)  # the preview and every FHIR read carried the token
    pg.wait_for_selector("#result:not([hidden])")
    assert pg.inner_text("#triage") == "URGENT"  # a white film: every tiny-model finding detected
    assert pg.locator("#findings-body tr").count() == 3
    assert pg.evaluate("() => sessionStorage.getItem('cxr-access-token')") == TOKEN
    assert pg.evaluate("() => localStorage.length") == 0 and TOKEN not in pg.url
    pg.reload()
    pg.wait_for_selector("body[data-ready=true]")
    assert pg.input_value("#token") == TOKEN  # kept for the session: asked once
    assert pg.locator("#error").is_hidden()
    context.close()
    assert not watch.problems, watch.problems
