"""A workflow a user saved with the V1 nodes still opens, keeps its values and runs (issue 24, item 5).

tests/fixtures/saved_before_v3.json was saved by the real frontend (1.27.10, ComfyUI 0.3.64) from the shipped
demo graph after changing widgets away from their defaults (tests/fixtures/README.md says which). This test
opens it in a real browser through the app (`app.loadGraphData`, what dropping the file on the canvas does) and
checks that every node type is known, that every changed widget shows the saved value, that the app's prompt
carries the saved values, and queues that prompt on the same real ComfyUI and waits for success.

The fixture was made with
    COMFYUI_DIR=... python tests/test_browser_saved_workflow.py --make
(which does what a user does: opens ComfyUI, loads the shipped graph, sets the widgets, exports the workflow
with the app's "Export" command). Do not remake it after the V3 migration: it records what users have saved.

Skips with the reason when COMFYUI_DIR or Chromium is absent.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from cdp_pipe import Browser, find_browser
from conftest import ROOT, SHARED, comfyui_dir, comfyui_skip_reason
from test_browser_templates import APP, ComfyUI, load_graph, open_app, widget_mismatches
from test_comfyui_e2e import run_prompt

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]
COMFYUI_DIR = str(comfyui_dir() or "") or None  # $COMFYUI_DIR, else the pinned cache
FIXTURE = Path(__file__).parent / "fixtures" / "saved_before_v3.json"
SOURCE = ROOT / "example_workflows" / "facemend_demo.json"
PHOTO = SHARED / "faces" / "clean" / "astronaut.png"  # one face: a short CPU run

# (node id, node type, widget name, shipped value, value set in the UI): one widget of each kind.
CHANGES = [
    (3, "FaceMend_DetectAlign", "score_threshold", 0.8, 0.7),        # FLOAT
    (3, "FaceMend_DetectAlign", "interpolation", "bicubic", "bilinear"),  # combo
    (4, "FaceMend_PerImageTune", "steps", 200, 6),                   # INT (also keeps the CPU run short)
    (4, "FaceMend_PerImageTune", "crop_size", 64, 48),               # INT
    (4, "FaceMend_PerImageTune", "self_ensemble", False, True),      # BOOLEAN
    (5, "FaceMend_ColorFix", "method", "wavelet", "adain"),          # combo
    (5, "FaceMend_ColorFix", "strength", 1.0, 0.85),                 # FLOAT
    (8, "SaveImage", "filename_prefix", "facemend_demo", "facemend_before_v3"),  # STRING
]


def widget_values(browser: Browser) -> dict:
    """{node id: {widget name: value}} as the app's widgets show them now."""
    return browser.evaluate(f"""Object.fromEntries({APP}.graph.nodes.map(n => [n.id,
        Object.fromEntries((n.widgets ?? []).map(w => [w.name, w.value]))]))""")


def _browser_and_host(tmp: Path):
    if not COMFYUI_DIR or not Path(COMFYUI_DIR, "main.py").is_file():
        pytest.skip(comfyui_skip_reason())
    exe = find_browser()
    if exe is None:
        pytest.skip("needs Chromium: apt-get install chromium (or set FACEMEND_CHROMIUM to a Chrome/Chromium binary)")
    host = ComfyUI(tmp, None)
    try:
        browser = Browser(exe)
    except Exception:
        host.close()
        raise
    return host, browser


# ---------------------------------------------------------------------------------------------- the test

def test_saved_v1_workflow_opens_with_its_values_and_runs(tmp_path):
    if not PHOTO.is_file():
        pytest.skip(f"needs the shared test photos ({PHOTO.relative_to(SHARED.parent)})")
    saved = json.loads(FIXTURE.read_text())
    host, browser = _browser_and_host(tmp_path / "comfy")
    try:
        # The demo graph needs no model file (embedded MTCNN, ZSSR learns from the photo): a photo with faces
        # in input/example.png is all it reads.
        from PIL import Image
        Image.open(PHOTO).convert("RGB").save(host.base / "input" / "example.png")
        version = open_app(browser, host.url)
        got = load_graph(browser, saved)
        where = f"tests/fixtures/saved_before_v3.json in frontend {version}"
        assert got["missing"] == [], f"{where}: the app reports missing node types {got['missing']}"
        assert got["notices"] == [], f"{where}: the app shows a dialog, warning or toast: {got['notices']}"
        assert got["exceptions"] == [], f"{where}: the page threw while loading: {got['exceptions']}"
        types = {n["type"] for n in saved["nodes"]}
        known = browser.evaluate(f"{json.dumps(sorted(types))}.filter(t => !!LiteGraph.registered_node_types[t])")
        assert sorted(known) == sorted(types), f"{where}: unknown node types {sorted(types - set(known))}"

        shown = widget_values(browser)
        wrong = [f"node {nid} ({kind}).{name}: saved {value!r}, shows {shown[str(nid)].get(name)!r}"
                 for nid, kind, name, _, value in CHANGES if shown[str(nid)].get(name) != value]
        assert not wrong, f"{where}: widgets lost their saved values:\n" + "\n".join(wrong)
        bad = widget_mismatches(saved, got["serialized"])
        assert not bad, f"{where}: widget values read back from the app differ from the file:\n" + "\n".join(bad)
        for nid, kind, name, _, value in CHANGES:
            assert got["prompt"][str(nid)]["inputs"][name] == value, (nid, name, got["prompt"][str(nid)]["inputs"])

        # Queue what the app would queue, on the same host.
        entry = run_prompt(host.url, got["prompt"], timeout=600)
        # The saved picture; the nodes' own previews (temp images) sit beside it.
        images = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
        assert [img["filename"].split("_0")[0] for img in images] == ["facemend_before_v3"], images
        result = Image.open(host.base / "output" / images[0]["subfolder"] / images[0]["filename"])
        source = Image.open(host.base / "input" / "example.png")
        assert result.size == (2 * source.width, 2 * source.height)  # the demo is an x2 face super-resolution
    finally:
        browser.close()
        host.close()


# ---------------------------------------------------------------------------------------------- making it

def make_fixture(tmp: Path) -> None:
    """Open the shipped demo graph in the app, set the widgets of CHANGES as a user does (the widget's value and
    its callback, what the canvas calls on a click/drag/pick), export it with the app's Export command."""
    host, browser = _browser_and_host(tmp / "comfy")
    try:
        version = open_app(browser, host.url)
        # Export asks for a file name unless this setting is off; the download lands in `downloads`.
        browser.evaluate(f"{APP}.extensionManager.setting.set('Comfy.PromptFilename', false)")
        downloads = tmp / "downloads"
        downloads.mkdir()
        browser.call("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)},
                     session=False)
        got = load_graph(browser, json.loads(SOURCE.read_text()))
        assert got["missing"] == [] and got["notices"] == [], got
        for nid, kind, name, old, new in CHANGES:
            now = browser.evaluate(f"""(() => {{
                const node = {APP}.graph.getNodeById({nid});
                if (node.type !== {json.dumps(kind)}) throw new Error('node {nid} is ' + node.type);
                const w = node.widgets.find(w => w.name === {json.dumps(name)});
                if (w.value !== {json.dumps(old)}) throw new Error('{name} was ' + w.value);
                w.value = {json.dumps(new)};
                w.callback?.(w.value, {APP}.canvas, node, [0, 0], undefined);
                node.onWidgetChanged?.(w.name, w.value, {json.dumps(old)}, w);
                {APP}.graph.setDirtyCanvas(true, true);
                return w.value;
            }})()""")
            assert now == new, (nid, name, now)
        browser.evaluate(f"{APP}.extensionManager.command.execute('Comfy.ExportWorkflow')")
        deadline = time.time() + 30
        while not list(downloads.glob("*.json")) and time.time() < deadline:
            time.sleep(0.5)
        files = list(downloads.glob("*.json"))
        assert len(files) == 1, f"the Export command downloaded {files}"
        saved = json.loads(files[0].read_text())
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps(saved, indent=1) + "\n")
        print(f"wrote {FIXTURE} (exported as {files[0].name} by frontend {version})")
    finally:
        browser.close()
        host.close()


if __name__ == "__main__":
    if "--make" not in sys.argv:
        sys.exit("usage: COMFYUI_DIR=... python tests/test_browser_saved_workflow.py --make")
    import tempfile
    with tempfile.TemporaryDirectory(prefix="facemend-saved-") as d:
        make_fixture(Path(d))
