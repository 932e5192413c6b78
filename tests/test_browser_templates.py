"""The shipped UI graphs opened in a real browser, the way a person opens them in ComfyUI.

A real ComfyUI ($COMFYUI_DIR, --cpu, this checkout symlinked into a temporary custom_nodes/) serves its web
frontend; a headless Chromium (Debian's `chromium`, driven over the DevTools protocol, tests/cdp_pipe.py) opens
it, loads each UI-format graph the pack ships through the app (`app.loadGraphData`, what dropping the file on
the canvas does) and reads the graph back from the app. For every graph:
- the app reports no missing node type, shows no error dialog or error toast and throws no exception;
- every node's widget values, serialized back by the app, equal the file's `widgets_values` (a missing or
  extra slot shifts every later value: the classic broken-workflow symptom);
- the prompt the app would queue (`graphToPrompt`) equals the shipped API twin of the graph;
- no two nodes overlap as the frontend draws them (it grows nodes to fit their widgets).
One template (fast) is also queued from the app with a tiny random-weight GFPGAN and a real face photo: when it
finishes, the app holds RestoreFaces' preview (app.nodeOutputs, node.imgs) and a screenshot shows it on the node.
It runs with the frontend ComfyUI's requirements.txt pins (the one installed next to ComfyUI) and, when
$FACEMEND_FRONTEND_ROOT names another comfyui-frontend-package (a `pip install --target` folder or its
`static/` folder), with that one too, through ComfyUI's --front-end-root.

Skips with the reason when COMFYUI_DIR or Chromium is absent. Screenshots of each loaded graph go to
$FACEMEND_BROWSER_SHOTS when set (the test's temporary folder otherwise).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cdp_pipe import Browser, find_browser
from test_comfyui_e2e import _free_port as _port, _get  # the port range and JSON GET the e2e tests use
from conftest import ROOT, comfyui_dir, comfyui_skip_reason

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]
COMFYUI_DIR = str(comfyui_dir() or "") or None  # $COMFYUI_DIR, else the pinned cache
PACK_FOLDER = "ComfyUI-FaceMend"  # any folder name works; this is the one the test installs under
APP = "(window.app ?? window.comfyAPI?.app?.app)"  # 1.27 sets window.app; newer ones keep it in comfyAPI too
TEMPLATE_FOLDERS = ("example_workflows", "workflows")  # the folders ComfyUI's template listing scans, in order


# ---------------------------------------------------------------------------------------------- the graphs

def _is_api_graph(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, dict) and "class_type" in v for v in obj.values())


def ui_graphs() -> list[Path]:
    """Every UI-format graph the pack ships in a folder ComfyUI lists templates from (told apart by content)."""
    found = []
    for folder in TEMPLATE_FOLDERS:
        for path in sorted((ROOT / folder).glob("*.json")):
            obj = json.loads(path.read_text())
            if isinstance(obj, dict) and isinstance(obj.get("nodes"), list):
                found.append(path)
            else:
                assert _is_api_graph(obj), f"{path.relative_to(ROOT)} is neither a UI graph nor an API graph"
    return found


def api_twin(ui_path: Path) -> Path:
    """The API graph generated from the same description (workflows/api/X.json or X_api.json beside X.json)."""
    candidates = [ROOT / "workflows" / "api" / ui_path.name, ui_path.with_name(ui_path.stem + "_api.json")]
    for c in candidates:
        if c.is_file():
            return c
    raise AssertionError(f"{ui_path.relative_to(ROOT)} has no API twin (looked for "
                         f"{', '.join(str(c.relative_to(ROOT)) for c in candidates)}); run workflows/generate.py")


GRAPHS = ui_graphs()


def widget_mismatches(file_graph: dict, app_graph: dict) -> list[str]:
    """Nodes whose widget values in the app differ from the file's (by node id), one line each."""
    app_nodes = {str(n["id"]): n for n in app_graph["nodes"]}
    out = []
    for node in file_graph["nodes"]:
        got = app_nodes.get(str(node["id"]))
        if got is None:
            out.append(f"node {node['id']} ({node['type']}) is missing from the app's graph")
            continue
        want = node.get("widgets_values", [])
        have = got.get("widgets_values", [])
        if isinstance(want, dict) or isinstance(have, dict):  # newer frontends may key values by name
            ok = want == have
        else:
            ok = len(want) == len(have) and all(_same(a, b) for a, b in zip(want, have))
        if not ok:
            out.append(f"node {node['id']} ({node['type']}): file {want!r}, app {have!r}")
    return out


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)  # JSON 1.0 and 1 are one number to the app
    return a == b


def overlaps(boxes: list[dict]) -> list[str]:
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            ax, ay, aw, ah = a["box"]
            bx, by, bw, bh = b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append(f"{a['id']} ({a['type']}) {a['box']} overlaps {b['id']} ({b['type']}) {b['box']}")
    return out


def _inside(box, outer) -> bool:
    return (box[0] >= outer[0] and box[1] >= outer[1] and box[0] + box[2] <= outer[0] + outer[2]
            and box[1] + box[3] <= outer[1] + outer[3])


# ---------------------------------------------------------------------------------------------- the host

def pinned_frontend_version() -> str | None:
    req = Path(COMFYUI_DIR, "requirements.txt")
    m = re.search(r"^comfyui-frontend-package==(\S+)", req.read_text(), re.M) if req.is_file() else None
    return m.group(1) if m else None


def newest_frontend_root() -> Path | None:
    """The static folder of the frontend named by $FACEMEND_FRONTEND_ROOT (a --target folder or static/)."""
    env = os.environ.get("FACEMEND_FRONTEND_ROOT")
    if not env:
        return None
    for cand in (Path(env), Path(env) / "static", Path(env) / "comfyui_frontend_package" / "static"):
        if (cand / "index.html").is_file():
            return cand
    raise AssertionError(f"FACEMEND_FRONTEND_ROOT={env} holds no frontend (no index.html in it, in static/ or in "
                         "comfyui_frontend_package/static/): pip install --target DIR comfyui-frontend-package")


class ComfyUI:
    def __init__(self, base: Path, front_end_root: Path | None):
        for sub in ("custom_nodes", "input", "output", "models", "user/default", "temp"):
            (base / sub).mkdir(parents=True)
        (base / "custom_nodes" / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
        # A fresh user folder opens the first-run templates dialog over the canvas; a returning user has none.
        (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        # A user who followed the README's model table: the files the graphs name are in place (empty here, the
        # test queues nothing). Newer frontends flag a model combo whose file is absent, and should only for
        # a file the README does not tell how to get.
        from facemend.host.model_paths import KNOWN_FILES
        for path in GRAPHS:
            for node in json.loads(path.read_text())["nodes"]:
                for value in node.get("widgets_values") or []:
                    if isinstance(value, str) and value in KNOWN_FILES:
                        target = base / "models" / KNOWN_FILES[value].folder / value
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.touch()
        # A ComfyUI install has input/example.png, which the LoadImage node of every template names.
        example = Path(COMFYUI_DIR, "input", "example.png")
        if example.is_file():
            shutil.copy(example, base / "input" / "example.png")
        else:
            from PIL import Image
            Image.new("RGB", (64, 64), (128, 100, 90)).save(base / "input" / "example.png")
        self.base = base
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        extra = ["--front-end-root", str(front_end_root)] if front_end_root else []
        self._log = open(base / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
             *extra],
            cwd=COMFYUI_DIR, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        deadline = time.time() + 180
        while True:
            try:
                _get(self.url + "/system_stats", timeout=2)
                return
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.close()
                    raise AssertionError("ComfyUI did not start:\n" + self.log()[-4000:])
                time.sleep(1)

    def log(self) -> str:
        return (self.base / "server.log").read_text()

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def open_app(browser: Browser, url: str) -> str:
    """Open ComfyUI's page, wait until the graph canvas is up; the frontend's version."""
    browser.navigate(url + "/")
    # Ready once the app has drawn its first graph (a new user's default one): loading earlier races the
    # canvas set-up in newer frontends ("getCanvas: canvas is null").
    browser.wait_for(f"!!({APP}?.vueAppReady && {APP}.canvas && {APP}.graph?.nodes?.length)", timeout=120,
                     what="ComfyUI's app to show its first graph")
    # The app's own verdict on missing node types: every frontend passes them to this extension hook.
    return browser.evaluate(f"""(() => {{
        {APP}.registerExtension({{name: 'facemend.test.missing', afterConfigureGraph(missing) {{
            window.__fmMissing = JSON.parse(JSON.stringify(missing ?? []));
        }}}});
        return window.__COMFYUI_FRONTEND_VERSION__ ?? 'unknown';
    }})()""")


# What the app shows a person: modal dialogs (1.27's "Some Nodes Are Missing"), toasts and the status cards
# newer frontends use instead ("Missing node: ..."), visible and with text.
MODALS = """[...document.querySelectorAll('.p-dialog, [role=dialog], [role=alertdialog]')]
    .filter(d => d.getClientRects().length).map(d => d.innerText.trim().slice(0, 400))"""
NOTICES = """[...document.querySelectorAll(
        '.p-dialog, [role=dialog], [role=alertdialog], [role=alert], [role=status], .p-toast-message')]
    .filter(d => d.getClientRects().length && !d.closest('.p-hidden-accessible') && d.innerText.trim())
    .map(d => d.innerText.trim().replace(/\\s+/g, ' ').slice(0, 400))"""


def load_graph(browser: Browser, graph: dict, settle: float = 1.5) -> dict:
    """Load a UI graph through the app; what the app and page report afterwards."""
    assert browser.evaluate(MODALS) == [], "a dialog was already open before loading"
    first_event = len(browser.events)
    browser.evaluate("window.__fmMissing = null")
    browser.evaluate(f"(async () => {{ await {APP}.loadGraphData({json.dumps(graph)}); return true }})()", timeout=60)
    browser.wait_for("window.__fmMissing !== null", timeout=30, what="the app to finish configuring the graph")
    time.sleep(settle)  # dialogs and toasts open on the next frames
    exceptions = [e for e in browser.page_errors_since(first_event) if e.startswith("exception")]
    return {
        "missing": browser.evaluate("window.__fmMissing"),
        "notices": browser.evaluate(NOTICES),
        "exceptions": exceptions,
        "serialized": browser.evaluate(f"{APP}.graph.serialize()"),
        "prompt": browser.evaluate(f"(async () => (await {APP}.graphToPrompt()).output)()"),
        "boxes": browser.evaluate(f"""{APP}.graph.nodes.map(n => ({{id: n.id, type: n.type,
            box: Array.from(n.getBounding()).map(Math.round)}}))"""),
        "group_titles": browser.evaluate(f"""{APP}.graph.groups.map(g => ({{id: 'group', type: g.title,
            box: [...Array.from(g.boundingRect ?? g._bounding).slice(0, 3), g.titleHeight ?? 32]}}))"""),
        "groups": browser.evaluate(f"""{APP}.graph.groups.map(g => ({{id: 'group', type: g.title,
            box: Array.from(g.boundingRect ?? g._bounding).slice(0, 4)}}))"""),
        "view": browser.evaluate(f"""(() => {{ const c = {APP}.canvas; c.draw(true, true);
            return {{scale: c.ds.scale, visible: (c.visible_nodes ?? []).length, nodes: {APP}.graph.nodes.length}} }})()"""),
    }


# ---------------------------------------------------------------------------------------------- fixtures

FRONTENDS = ["pinned", "newest"]


@pytest.fixture(scope="module", params=FRONTENDS)
def page(request, tmp_path_factory):
    if not COMFYUI_DIR or not Path(COMFYUI_DIR, "main.py").is_file():
        pytest.skip(comfyui_skip_reason())
    exe = find_browser()
    if exe is None:
        pytest.skip("needs Chromium: apt-get install chromium (or set FACEMEND_CHROMIUM to a Chrome/Chromium binary)")
    front_end_root = None
    if request.param == "newest":
        front_end_root = newest_frontend_root()
        if front_end_root is None:
            pytest.skip("set FACEMEND_FRONTEND_ROOT to a newer comfyui-frontend-package "
                        "(pip install --target DIR comfyui-frontend-package) to test it too")
    host = ComfyUI(tmp_path_factory.mktemp(f"comfy_{request.param}"), front_end_root)
    browser = None
    try:
        browser = Browser(exe)
        version = open_app(browser, host.url)
        if request.param == "pinned":
            pinned = pinned_frontend_version()
            if pinned and version != pinned:
                pytest.skip(f"the installed comfyui-frontend-package is {version}, ComfyUI's requirements.txt pins "
                            f"{pinned}: pip install -r $COMFYUI_DIR/requirements.txt")
        shots = Path(os.environ.get("FACEMEND_BROWSER_SHOTS") or tmp_path_factory.mktemp("shots"))
        shots.mkdir(parents=True, exist_ok=True)
        yield {"browser": browser, "host": host, "version": version, "shots": shots, "kind": request.param}
    finally:
        if browser is not None:
            browser.close()
        host.close()


def _fresh(page):
    """Reopen the page when an earlier load left a dialog open (each graph starts from a clean page). The app
    restores the last graph it showed from the browser's storage (1.27 reopens the broken graph, and its dialog):
    that is forgotten first."""
    if page["browser"].evaluate(MODALS):
        page["browser"].evaluate("(() => { localStorage.clear(); sessionStorage.clear(); return true })()")
        open_app(page["browser"], page["host"].url)


# ---------------------------------------------------------------------------------------------- tests

@pytest.mark.skipif(not GRAPHS, reason="the pack ships no UI-format graph")
@pytest.mark.parametrize("path", GRAPHS, ids=[str(p.relative_to(ROOT)) for p in GRAPHS])
def test_graph_opens_in_the_app_with_its_values(page, path):
    browser = page["browser"]
    _fresh(page)
    graph = json.loads(path.read_text())
    got = load_graph(browser, graph)
    where = f"{path.relative_to(ROOT)} in frontend {page['version']}"
    shot = page["shots"] / f"{path.parent.name}__{path.stem}__frontend-{page['version']}.png"
    browser.screenshot(shot)

    assert got["missing"] == [], f"{where}: the app reports missing node types {got['missing']}"
    assert got["notices"] == [], f"{where}: the app shows a dialog, warning or toast: {got['notices']}"
    assert got["exceptions"] == [], f"{where}: the page threw while loading: {got['exceptions']}"

    assert len(got["serialized"]["nodes"]) == len(graph["nodes"]), f"{where}: node count changed"
    bad = widget_mismatches(graph, got["serialized"])
    assert not bad, f"{where}: widget values read back from the app differ from the file:\n" + "\n".join(bad)

    api = json.loads(api_twin(path).read_text())
    prompt = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in got["prompt"].items()}
    want = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert prompt == want, (f"{where}: the prompt the app would queue differs from {api_twin(path).relative_to(ROOT)}"
                            f":\napp  {json.dumps(prompt, sort_keys=True)}\nfile {json.dumps(want, sort_keys=True)}")

    # Layout as the frontend draws it (it grows nodes to fit their widgets and titles).
    layout = overlaps(got["boxes"])
    layout += [line + " (covers the group's title)" for title in got["group_titles"]
               for line in overlaps([title] + got["boxes"]) if line.startswith("group ")]
    layout += [f"{n['id']} ({n['type']}) {n['box']} sticks out of group {g['type']} {g['box']}"
               for g in got["groups"] for n in got["boxes"] if overlaps([g, n]) and not _inside(n["box"], g["box"])]
    assert not layout, f"{where}: nodes overlap as the frontend draws them:\n" + "\n".join(layout)
    print(f"{where}: opens at zoom {got['view']['scale']:.2f}, {got['view']['visible']}/{got['view']['nodes']} "
          f"nodes in the 1600x1000 view; screenshot {shot}")


def test_the_checks_catch_a_broken_graph(page):
    """The same checks on a graph broken the two usual ways: an unknown node type, a widget slot missing."""
    browser = page["browser"]
    _fresh(page)
    graph = json.loads(GRAPHS[0].read_text()) if GRAPHS else pytest.skip("no UI graph shipped")
    node = next(n for n in graph["nodes"] if len(n.get("widgets_values") or []) >= 2)
    node["widgets_values"] = node["widgets_values"][1:]  # one slot short: the app shifts what follows
    unknown = json.loads(json.dumps(node))
    unknown.update(id=max(n["id"] for n in graph["nodes"]) + 1, type="FaceMend_NoSuchNode", inputs=[], outputs=[])
    unknown["pos"] = [unknown["pos"][0], unknown["pos"][1] + 2000]
    graph["nodes"].append(unknown)
    got = load_graph(browser, graph, settle=2.5)
    missing = [m if isinstance(m, str) else m.get("type") for m in got["missing"]]
    assert missing == ["FaceMend_NoSuchNode"], got["missing"]
    # 1.27 names the type in a modal; 1.58 shows a card ("Missing node: ...", or "2 issues found" with both faults).
    assert got["notices"], f"frontend {page['version']}: the page shows nothing about the broken graph"
    assert any(str(node["id"]) in line for line in widget_mismatches(graph, got["serialized"]))
    open_app(browser, page["host"].url)  # leave a clean page behind


def test_template_listing_serves_the_ui_graphs(page):
    """ComfyUI's /workflow_templates (the templates browser's Custom Nodes list) lists each UI graph of the
    folder it serves, and /api/workflow_templates serves that very file."""
    url = page["host"].url
    listing = _get(url + "/workflow_templates").get(PACK_FOLDER, [])
    served_folder = next((f for f in TEMPLATE_FOLDERS if (ROOT / f).is_dir()), None)
    ui = [p for p in GRAPHS if p.parent.name == served_folder]
    assert ui, f"no UI graph in {served_folder}/"
    for path in ui:
        assert path.stem in listing, f"/workflow_templates does not list {path.stem}: {listing}"
        with urllib.request.urlopen(f"{url}/api/workflow_templates/{PACK_FOLDER}/{path.name}", timeout=10) as r:
            assert json.loads(r.read()) == json.loads(path.read_text())
    report = []
    for name in sorted(set(listing)):
        try:
            with urllib.request.urlopen(f"{url}/api/workflow_templates/{PACK_FOLDER}/{name}.json", timeout=10) as r:
                obj = json.loads(r.read())
            kind = "UI graph" if isinstance(obj, dict) and "nodes" in obj else "API graph (opens empty or fails)"
        except urllib.error.HTTPError as err:
            kind = f"not served (HTTP {err.code})"
        report.append(f"{name}: {kind}")
    dupes = sorted({n for n in listing if listing.count(n) > 1})
    print(f"/workflow_templates lists for {PACK_FOLDER}: " + "; ".join(report) + (f"; listed twice: {dupes}" if dupes else ""))


# ---------------------------------------------------------------------------------------------- a run in the app

PREVIEW_GRAPH = ROOT / "example_workflows" / "facemend_fast.json"


def _tiny_gfpgan(path: Path) -> None:
    """Random GFPGAN v1.4 weights at the e2e tests' small size, in the official layout, over the empty file."""
    import torch

    from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean

    torch.manual_seed(0)
    net = GFPGANv1Clean(GFPGANConfig(out_size=64, num_style_feat=64, narrow=0.25))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": net.state_dict()}, path)


def test_a_template_queued_in_the_app_shows_the_restored_faces_on_its_node(page):
    """The fast template queued from the app (tiny random GFPGAN, a real face photo): when it finishes, the app holds
    RestoreFaces' preview images (app.nodeOutputs, node.imgs, what the node draws) and the screenshot shows them;
    Paste Back shows the photo before | after."""
    from conftest import need_shared

    browser, host = page["browser"], page["host"]
    _fresh(page)
    graph = json.loads(PREVIEW_GRAPH.read_text())
    restore = next(n for n in graph["nodes"] if n["type"] == "FaceMend_RestoreFaces")
    loader = next(n for n in graph["nodes"] if n["type"] == "FaceMend_RestorerLoader")
    _tiny_gfpgan(host.base / "models" / "facerestore_models" / loader["widgets_values"][0])
    from PIL import Image

    # The template's own input name (a choice the page already lists), now a photo with a face.
    Image.open(need_shared("faces", "clean", "ffhq_00000000.png")).convert("RGB").resize((256, 256)).save(
        host.base / "input" / "example.png")
    for node in graph["nodes"]:
        if node["type"] == "FaceMend_DetectAlign":  # a CPU-sized crop; the same graph otherwise
            node["widgets_values"][5] = 128
    got = load_graph(browser, graph)
    assert got["missing"] == [] and got["exceptions"] == [], got
    before = set(_get(host.url + "/history"))
    browser.evaluate(f"(async () => {{ await {APP}.queuePrompt(0, 1); return true }})()", timeout=60)
    deadline = time.time() + 300
    entry = None
    while time.time() < deadline and entry is None:
        new = {k: v for k, v in _get(host.url + "/history").items() if k not in before}
        entry = next((v for v in new.values() if v.get("status", {}).get("completed") is not None), None)
        time.sleep(1)
    assert entry is not None, "the queued graph did not finish:\n" + host.log()[-3000:]
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    rid = str(restore["id"])
    assert [ref["type"] for ref in entry["outputs"][rid]["images"]] == ["temp"]  # one face, its preview
    shown = browser.wait_for(f"""(() => {{
        const node = {APP}.graph.getNodeById({rid});
        const out = ({APP}.nodeOutputs ?? {{}})['{rid}'];
        const imgs = (node?.imgs ?? []).filter(i => i.complete && i.naturalWidth > 0);
        return out?.images?.length && imgs.length
            ? {{outputs: out.images.map(i => i.type + ':' + i.filename), width: imgs[0].naturalWidth,
               src: imgs[0].src}} : null;
    }})()""", timeout=60, what="RestoreFaces' preview images in the app")
    assert shown["outputs"] == [f"temp:{entry['outputs'][rid]['images'][0]['filename']}"]
    assert shown["width"] == 128 and "type=temp" in shown["src"]
    # The restored face drawn on its node, the node in view: the screenshot a person would see.
    browser.evaluate(f"""(() => {{ const c = {APP}.canvas, n = {APP}.graph.getNodeById({rid});
        c.ds.scale = 1; c.ds.offset[0] = -n.pos[0] + 200; c.ds.offset[1] = -n.pos[1] + 150;
        c.setDirty(true, true); c.draw(true, true); return true }})()""")
    time.sleep(1.0)
    shot = page["shots"] / f"run__{PREVIEW_GRAPH.stem}__frontend-{page['version']}.png"
    browser.screenshot(shot)
    print(f"{PREVIEW_GRAPH.name} run in frontend {page['version']}: RestoreFaces shows {shown['outputs']}; "
          f"screenshot {shot}")
    # Paste Back shows the photo before | after: one labelled pair of the 256 px input and result, 8 px apart.
    pid = str(next(n for n in graph["nodes"] if n["type"] == "FaceMend_PasteBack")["id"])
    assert [ref["type"] for ref in entry["outputs"][pid]["images"]] == ["temp"]
    pair = browser.wait_for(f"""(() => {{
        const imgs = ({APP}.graph.getNodeById({pid})?.imgs ?? []).filter(i => i.complete && i.naturalWidth > 0);
        return imgs.length ? {{width: imgs[0].naturalWidth, height: imgs[0].naturalHeight}} : null;
    }})()""", timeout=60, what="Paste Back's before/after preview in the app")
    assert pair == {"width": 2 * 256 + 8, "height": 256}
    browser.evaluate(f"""(() => {{ const c = {APP}.canvas, n = {APP}.graph.getNodeById({pid});
        c.ds.scale = 1; c.ds.offset[0] = -n.pos[0] + 200; c.ds.offset[1] = -n.pos[1] + 150;
        c.setDirty(true, true); c.draw(true, true); return true }})()""")
    time.sleep(1.0)
    browser.screenshot(page["shots"] / f"run__{PREVIEW_GRAPH.stem}__pasteback__frontend-{page['version']}.png")
