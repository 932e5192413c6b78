"""The templates in a real browser (Debian's headless chromium, driven over the DevTools protocol): ComfyUI's own
frontend opens each example_workflows/ graph as the templates browser does, and the page reports no missing node
type, no error dialog, and widget values equal to the file's (read back from the app's graph).

Runs with the frontend the ComfyUI snapshot pins (its requirements.txt) and, when $FACEMEND_FRONTEND_ROOT names
the `static` folder of another comfyui-frontend-package (e.g. the newest: `pip download --no-deps
comfyui-frontend-package` and unzip the wheel), with that one through ComfyUI's --front-end-root.
Skipped with the reason without COMFYUI_DIR or chromium.
"""
import json
import os
from pathlib import Path

import pytest

from cdp_browser import Browser, chromium_missing
from comfy_servers import PACK_FOLDER, ComfyServer, comfyui_missing, free_port
from conftest import ROOT

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]
NEWEST = os.environ.get("FACEMEND_FRONTEND_ROOT")
TEMPLATES = sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))

LOAD = """(async () => {
  const name = %s;
  const res = await fetch(`/api/workflow_templates/%s/${name}.json`);
  const data = await res.json();
  const before = document.querySelectorAll('.p-dialog').length;
  await window.app.loadGraphData(data, true, true, name);
  await new Promise(r => setTimeout(r, 1500));
  const registered = window.LiteGraph.registered_node_types;
  const graph = window.app.graph.serialize();
  return {
    missing: data.nodes.filter(n => !registered[n.type]).map(n => n.type),
    dialogs: [...document.querySelectorAll('.p-dialog')].slice(before).map(d => d.innerText.slice(0, 500)),
    nodes: graph.nodes.map(n => ({id: n.id, type: n.type, widgets_values: n.widgets_values})),
    links: graph.links.length,
  };
})()"""


@pytest.fixture(scope="module", params=["pinned", "newest"])
def app_page(request, tmp_path_factory):
    for reason in (comfyui_missing(), chromium_missing()):
        if reason:
            pytest.skip(reason)
    args = ()
    if request.param == "newest":
        if not NEWEST or not Path(NEWEST, "index.html").is_file():
            pytest.skip("set FACEMEND_FRONTEND_ROOT to the static/ folder of the newest comfyui-frontend-package "
                        "(pip download --no-deps comfyui-frontend-package; unzip the wheel)")
        args = ("--front-end-root", NEWEST)
    base = tmp_path_factory.mktemp(f"browser_{request.param}")
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    # A fresh user sees the tutorial / templates dialog first: mark it seen, as a returning user.
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    server = ComfyServer(base, free_port(8450, 8500), extra_args=args).wait_ready()
    browser = Browser(tmp_path_factory.mktemp("chromium"))
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=server.url)
        browser.wait_for("!!(window.app && window.app.graph && window.LiteGraph)", timeout=180)
        yield browser, request.param
    finally:
        browser.close()
        server.stop()


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_opens_in_comfyui_with_every_node_and_value(app_page, name):
    browser, frontend = app_page
    got = browser.evaluate(LOAD % (json.dumps(name), PACK_FOLDER))
    assert got["missing"] == [], f"{frontend}: missing node types {got['missing']}"
    assert got["dialogs"] == [], f"{frontend}: dialogs after loading {name}: {got['dialogs']}"
    data = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
    expected = {n["id"]: n for n in data["nodes"]}
    loaded = {n["id"]: n for n in got["nodes"]}
    assert set(loaded) == set(expected)
    for nid, node in expected.items():
        assert loaded[nid]["type"] == node["type"]
        assert loaded[nid]["widgets_values"] == node["widgets_values"], (frontend, nid, node["type"])
    assert got["links"] == len(data["links"])
