"""The headless client against real ComfyUI servers (COMFYUI_DIR; skipped with the reason without it).

- every shipped API graph (workflows/api/) runs end to end through the client, with small random-weight model
  files in the official layouts in a temporary models folder (random weights: the outputs prove the graphs
  run, not that they restore anything); every node of it that shows a preview showed one on the server, and
  the client wrote only the saved images;
- /workflow_templates lists the UI graphs and serves each one;
- a folder of 3 images across two servers on two local ports, one killed in the middle of the run: every
  output arrives exactly once and the report names the retry;
- Ctrl-C on `python -m facemend api` removes what it queued and interrupts what it runs;
- one server restarted in the middle of a run: the run waits for it and finishes every job.
The client's failure cases without ComfyUI (CI): tests/test_client_offline.py.
"""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from PIL import Image

from comfy_servers import PACK_FOLDER, ComfyServer, comfyui_missing, free_port, get_json
from conftest import ROOT, need_shared

pytestmark = pytest.mark.comfyui
PORTS = (int(os.environ.get("FACEMEND_TEST_PORT_LO", "8400")), int(os.environ.get("FACEMEND_TEST_PORT_HI", "8500")))


def _tiny_models(root):
    """GFPGAN (v1.3 and v1.4 names), TSD-SR, CLIP RN50-layout (for CLIP-IQA) and an ArcFace-shaped ONNX, all
    small and random, under the file names the shipped graphs ask for."""
    from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean

    torch.manual_seed(0)
    (root / "facerestore_models").mkdir(parents=True)
    net = GFPGANv1Clean(GFPGANConfig(out_size=64, num_style_feat=64, narrow=0.25))
    for name in ("GFPGANv1.4.pth", "GFPGANv1.3.pth"):
        torch.save({"params_ema": net.state_dict()}, root / "facerestore_models" / name)
    pytest.importorskip("diffusers")
    from onestep_models import make_tsdsr

    make_tsdsr(str(root), base_name="stable-diffusion-3-medium-diffusers")
    from osdface_models import make_osdface  # osdface: tiny SD-2.1-base + the three OSDFace files

    make_osdface(str(root), base_name="stable-diffusion-2-1-base")
    pytest.importorskip("pyiqa")
    from facemend.pipelines.quality import metrics as M

    M._import_pyiqa_archs()
    from pyiqa.archs.clip_model import CLIP

    (root / "facemend_iqa").mkdir()
    clip = CLIP(64, 224, (1, 1, 1, 1), 8, None, 77, 49408, 64, 1, 1)  # RN50's layout, 1/8 of its width
    torch.save(clip.state_dict(), root / "facemend_iqa" / "RN50.pt")
    pytest.importorskip("onnxruntime")
    arcface = root / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx"
    arcface.parent.mkdir(parents=True)
    idnet = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, 4), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 28 * 28, 512)).eval()
    torch.onnx.export(idnet, torch.rand(1, 3, 112, 112), str(arcface), input_names=["input.1"],
                      output_names=["embedding"], dynamic_axes={"input.1": {0: "N"}}, dynamo=False)
    # id_preserve: tiny RestorerID / IP-Adapter / CLIP-ViT-H / SD-1.5 files and a random-weight MUSIQ.
    from restorerid_models import make_restorerid_files

    make_restorerid_files(str(root))
    torch.save(M.build_pyiqa_net("musiq").state_dict(), root / "facemend_iqa" / M.SPECS["musiq"].file)
    # adapt: a small guided-diffusion UNet in the DifFace prior's key layout, random VGG-16 features for LPIPS,
    # and a folder of two aligned faces (64 px) to adapt to.
    pytest.importorskip("lpips")
    import torchvision

    from facemend.pipelines.adapt.prior import PriorUNet, PriorUNetConfig

    (root / "facemend_priors").mkdir()
    prior = PriorUNet(PriorUNetConfig(image_size=512, model_channels=32, channel_mult=(1, 1, 1, 1, 1, 2),
                                      num_res_blocks=(1, 1, 1, 1, 1, 1), attention_resolutions=(16,),
                                      num_head_channels=64))
    torch.save({f"module.{k}": v for k, v in prior.state_dict().items()},
               root / "facemend_priors" / "iddpm_ffhq512_ema500000.pth")
    feats = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()},
               root / "facemend_priors" / "vgg16-397923af.pth")
    faces = root.parent / f"{root.name}_album"
    faces.mkdir()
    src = need_shared("faces", "aligned_lq_real")
    for n in sorted(os.listdir(src))[:1]:
        Image.open(src / n).convert("RGB").resize((64, 64), Image.BICUBIC).save(faces / n)
    return faces


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two ComfyUI servers sharing one models folder: `steady` and `victim` (killed by the last test)."""
    reason = comfyui_missing()
    if reason:
        pytest.skip(reason)
    models = tmp_path_factory.mktemp("models")
    album = _tiny_models(models)
    started = []
    try:
        for name in ("steady", "victim"):
            port = free_port(*PORTS) if not started else free_port(started[-1].port + 1, PORTS[1])
            started.append(ComfyServer(tmp_path_factory.mktemp(name), port, models))
        for s in started:
            s.wait_ready()
        yield dict(zip(("steady", "victim"), started), album=album)
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three small real photos with one face each."""
    folder = tmp_path_factory.mktemp("photos")
    src = need_shared("faces", "clean", "ffhq_00000000.png")
    img = Image.open(src).convert("RGB").resize((192, 192), Image.BICUBIC)
    for k, name in enumerate(("a", "b", "c")):
        img.rotate(0 if k == 0 else 3 * k, resample=Image.BICUBIC).save(folder / f"{name}.png")
    return folder


# CPU-sized settings for every graph (the same graphs, smaller crops and fewer steps).
FAST = ["FaceMend_DetectAlign.crop_size=128", "FaceMend_PerImageTune.steps=2",
        "FaceMend_PerImageTune.crop_size=32", "FaceMend_PerImageTune.validation_interval=1",
        "FaceMend_OneStepSRLoader.precision=\"fp32\""]


def _run(urls, workflow, inputs, out, overrides=(), **kw):
    from facemend.client import Runner, apply_overrides, load_workflow
    from facemend.client.progress import Progress
    from facemend.client.workflow import find_nodes

    graph = load_workflow(workflow)
    graph = apply_overrides(graph, [o for o in overrides if find_nodes(graph, o.split("=")[0].rpartition(".")[0])])
    runner = Runner(urls, graph, out, progress=Progress(len(list(inputs.iterdir())), live=False), **kw)
    return runner, runner.run([inputs])


SHIPPED = sorted(p.stem.removeprefix("facemend_") for p in (ROOT / "workflows" / "api").glob("facemend_*.json"))


@pytest.mark.parametrize("preset", SHIPPED)
def test_every_shipped_api_graph_runs_with_random_weight_files(servers, photos, tmp_path, preset):
    overrides = list(FAST)
    if preset == "id_preserve":  # tiny RestorerID files (tests/restorerid_models.py), random MUSIQ, 2 DDIM steps
        overrides += ["FaceMend_DetectAlign.crop_size=64", "FaceMend_RestorerIDRestore.steps=2",
                      f"4.image=@{need_shared('faces', 'aligned_lq_real', '0143.png')}"]
    if preset == "adapt":  # one prior step, two training steps: the wiring, not the quality
        overrides += [f"FaceMend_AdaptRestorer.folder={servers['album']}", "FaceMend_AdaptRestorer.steps=2",
                      "FaceMend_AdaptRestorer.micro_batch=1", "FaceMend_AdaptRestorer.accumulate=2",
                      "FaceMend_AdaptRestorer.checkpoint_every=1", "FaceMend_AdaptRestorer.start_step=1",
                      "FaceMend_AdaptRestorer.reg_end_step=1", "FaceMend_AdaptRestorer.down_factor=16",
                      f"FaceMend_AdaptRestorer.name=\"album_{os.getpid()}\""]
    if preset == "ntire_full":
        # MANIQA's architecture is fixed at 136M parameters (a 545 MB random file): its slot gets a second small
        # CLIP-IQA here; MANIQA's own loading is tested in test_iqa_metrics.py.
        overrides.append("9.metric=clipiqa")
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").symlink_to(photos / "a.png")
    runner, report = _run([servers["steady"].url], preset, one, tmp_path / "out", overrides)
    job = report["jobs"][0]
    assert job["status"] == "done", job["error"]
    # Every node of the graph that shows a preview showed it on the server (/history), and none reached the client.
    from conftest import facemend_nodes
    from test_host_previews import shows_preview

    classes = facemend_nodes().NODE_CLASSES
    client_id = runner.servers[0].client_id
    (entry,) = [h for h in get_json(servers["steady"].url + "/history").values()
                if h["prompt"][3].get("client_id") == client_id]
    showing = [nid for nid, node in runner.graph.items()
               if node["class_type"] in classes and shows_preview(classes[node["class_type"]])]
    for nid in showing:
        refs = entry["outputs"].get(nid, {}).get("images", [])
        assert refs and all(r["type"] == "temp" for r in refs), f"{preset}: node {nid} showed no preview"
    saved = [r for out in entry["outputs"].values() for r in out.get("images", []) if r["type"] == "output"]
    assert len([p for p in (tmp_path / "out").iterdir() if p.suffix == ".png"]) == len(saved)
    out = Image.open(tmp_path / "out" / "a.png")
    scale = 2 if preset == "demo" else 1
    assert out.size == (192 * scale, 192 * scale)
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


def _queue(url, graph):
    """POST a graph to /prompt: (HTTP status, the JSON answer): 200 and a prompt_id, or 400 and node_errors."""
    req = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": graph}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_adapt_node_refuses_before_the_run_and_shows_its_results(servers):
    """In a real ComfyUI: the adapt graph's AdaptRestorer (loaders + the output node) runs and shows the loss curve
    and the first face before / after adapting, with where the model went; an existing name, a missing folder and
    a refused respacing come back from /prompt at once (validate_inputs, in ComfyUI's own validation), nothing run."""
    url = servers["steady"].url
    shipped = json.loads((ROOT / "workflows" / "api" / "facemend_adapt.json").read_text())
    adapt = {**shipped["6"]["inputs"], "folder": str(servers["album"]), "steps": 1, "micro_batch": 1,
             "accumulate": 1, "checkpoint_every": 1, "start_step": 1, "reg_end_step": 1, "down_factor": 16,
             "lpips_weight": 0.0, "name": f"shown_{os.getpid()}"}
    graph = {k: shipped[k] for k in ("4", "5")} | {"6": {"class_type": "FaceMend_AdaptRestorer", "inputs": adapt}}

    def run(graph):
        status, answer = _queue(url, graph)
        assert status == 200, answer
        deadline = time.time() + 300
        while time.time() < deadline:
            entry = get_json(f"{url}/history/{answer['prompt_id']}").get(answer["prompt_id"])
            if entry and entry.get("status", {}).get("completed") is not None:
                break
            time.sleep(1)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
        return entry

    shown = run(graph)["outputs"]["6"]
    assert [im["type"] for im in shown["images"]] == ["temp", "temp"]  # the loss curve, the face before | after
    curve, pair = (Image.open(servers["steady"].base / "temp" / im["subfolder"] / im["filename"])
                   for im in shown["images"])
    assert pair.size[0] > pair.size[1]  # two faces side by side
    (saved,) = shown["text"]
    path = saved.removeprefix("saved ")
    assert os.path.basename(path) == f"shown_{os.getpid()}.safetensors" and os.path.isfile(path)

    taken = os.path.join(os.path.dirname(path), f"taken_{os.getpid()}.safetensors")
    with open(taken, "wb") as fh:
        fh.write(b"someone else's model")
    try:
        for change, says in (({"name": f"taken_{os.getpid()}"}, "exists; FaceMend never overwrites"),
                             ({"folder": str(servers["album"]) + "_missing"}, "face folder not found"),
                             ({"respacing": "ddim25"}, "ddim")):
            bad = {**graph, "6": {**graph["6"], "inputs": {**adapt, **change}}}
            status, answer = _queue(url, bad)
            assert status == 400, answer
            details = [e["details"] for e in answer["node_errors"]["6"]["errors"]]
            assert any(says in d for d in details), details
    finally:
        os.remove(taken)
    # face_crops connected: the folder (here a stale one) is not read, so not checked either
    linked = {"7": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
              "6": {**graph["6"], "inputs": {**adapt, "name": f"linked_{os.getpid()}", "face_crops": ["7", 0],
                                             "folder": str(servers["album"]) + "_missing"}}}
    run({**graph, **linked})


def test_string_outputs_are_written_beside_the_image(servers, photos, tmp_path):
    """A STRING shown in the UI (core PreviewAny on DetectAlign's faces_json) arrives as <input>.json."""
    from facemend.client import Runner, load_workflow
    from facemend.client.progress import Progress

    graph = load_workflow("fast")
    graph["3"]["inputs"]["crop_size"] = 128
    graph["90"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 3]}}
    one = tmp_path / "one"
    one.mkdir()
    (one / "b.png").symlink_to(photos / "b.png")
    report = Runner([servers["steady"].url], graph, tmp_path / "out", progress=Progress(1, live=False)).run([one])
    assert report["jobs"][0]["status"] == "done", report["jobs"][0]["error"]
    assert report["jobs"][0]["outputs"][0].endswith("b.png")
    text = json.loads((tmp_path / "out" / "b.json").read_text())["90"]["text"][0]
    faces = json.loads(text)
    assert faces["crop_size"] == 128 and faces["image_sizes"] == [[192, 192]] and len(faces["faces"]) == 1


def test_workflow_templates_lists_the_ui_graphs_and_serves_each(servers):
    gen = _generate()
    url = servers["steady"].url
    listing = get_json(url + "/workflow_templates")[PACK_FOLDER]
    ui = sorted(gen.WORKFLOWS)
    # workflows/ is also scanned by ComfyUI: the pre-example_workflows files stay there (public API) until
    # generate.LEGACY is emptied; the API ones among them are listed but not served.
    legacy = sorted(list(gen.LEGACY) + [f"{n}_api" for n in gen.LEGACY])
    assert sorted(listing) == sorted(ui + legacy)
    for name in ui:
        with urllib.request.urlopen(f"{url}/api/workflow_templates/{PACK_FOLDER}/{name}.json", timeout=10) as r:
            served = json.loads(r.read())
        assert served == json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
        assert {"nodes", "links", "groups"} <= set(served)


def _generate():
    import importlib.util

    spec = importlib.util.spec_from_file_location("wf_generate", ROOT / "workflows" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ctrl_c_removes_what_the_run_queued(servers, photos, tmp_path):
    url = servers["steady"].url
    cmd = [sys.executable, "-c", "import sys; sys.path.insert(0, 'tests'); import conftest; "
           "from facemend.cli import main; sys.exit(main(sys.argv[1:]))", "api", "demo", str(photos),
           "-o", str(tmp_path / "out"), "--server", url, "--per-server", "2",
           "--set", "FaceMend_PerImageTune.steps=20000", "--set", "FaceMend_PerImageTune.crop_size=16"]
    def queued():
        q = get_json(url + "/queue")
        return {item[1] for item in q["queue_running"] + q["queue_pending"]}, q

    before = queued()[0]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while time.time() < deadline:
        ids, q = queued()
        ours = ids - before
        running_ours = {item[1] for item in q["queue_running"]} & ours
        if (len(ours) >= 2 and running_ours) or proc.poll() is not None:
            break
        time.sleep(0.5)
    if proc.poll() is not None or len(ours) < 2:
        proc.kill()
        pytest.fail("the client did not queue two jobs: " + proc.communicate()[0][-3000:])
    time.sleep(2)  # the running one is inside ZSSR now
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, output
    deadline = time.time() + 60
    while time.time() < deadline:
        if not queued()[0] & ours:
            break
        time.sleep(0.5)
    assert not queued()[0] & ours, "prompts of the cancelled run are still queued"
    history = get_json(url + "/history")
    interrupted = [pid for pid in running_ours
                   if any(m[0] == "execution_interrupted" for m in history.get(pid, {}).get("status", {}).get("messages", []))]
    assert interrupted, "the running job was not interrupted"
    assert not (ours - running_ours) & set(history), "a pending prompt of the cancelled run was executed"
    assert not list((tmp_path / "out").glob("*.png"))


def test_one_server_restarted_mid_run_every_output_arrives(servers, photos, tmp_path):
    """One server, three photos; the server killed after the first result and started again 8 s later on the same
    port: the run waits for it (--server-wait), re-uploads and re-queues what it lost, and every job is done."""
    import threading

    steady = servers["steady"]
    overrides = ["FaceMend_PerImageTune.steps=60", "FaceMend_PerImageTune.crop_size=32"]
    from facemend.client import Runner, apply_overrides, load_workflow
    from facemend.client.progress import Progress

    runner = Runner([steady.url], apply_overrides(load_workflow("demo"), overrides), tmp_path / "out",
                    per_server=1, retries=2, progress=Progress(3, live=False))
    result = {}
    thread = threading.Thread(target=lambda: result.update(report=runner.run([photos])))
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and not any(j.status == "done" for j in runner.jobs):
        time.sleep(0.2)
    assert any(j.status == "done" for j in runner.jobs), "no job finished"
    steady.kill()
    time.sleep(8)
    steady.start().wait_ready()
    thread.join(timeout=600)
    assert not thread.is_alive()
    report = result["report"]
    assert report["counts"] == {"done": 3}, json.dumps(report, indent=1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png",
                                                                    "facemend_api_report.json"]
    outages = report["servers"][0]["outages"]
    assert len(outages) == 1 and outages[0]["seconds"] >= 8
    assert all(len(j["failed_attempts"]) <= 1 for j in report["jobs"])


def test_two_servers_one_killed_mid_run_every_output_once_and_the_retry_named(servers, photos, tmp_path):
    """Runs last in this module: it kills `victim`."""
    import threading

    steady, victim = servers["steady"], servers["victim"]
    overrides = ["FaceMend_PerImageTune.steps=60", "FaceMend_PerImageTune.crop_size=32"]
    from facemend.client import Runner, apply_overrides, load_workflow
    from facemend.client.progress import Progress

    runner = Runner([victim.url, steady.url], apply_overrides(load_workflow("demo"), overrides), tmp_path / "out",
                    per_server=1, retries=2, progress=Progress(3, live=False))
    result = {}
    thread = threading.Thread(target=lambda: result.update(report=runner.run([photos])))
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline:  # kill the victim while it runs one of our jobs
        busy = [j for j in runner.jobs if j.status == "running" and j.server == victim.url]
        if busy and get_json(victim.url + "/queue")["queue_running"]:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the victim server never ran a job")
    victim_job = busy[0].name
    victim.kill()
    thread.join(timeout=400)
    assert not thread.is_alive()
    report = result["report"]
    assert report["counts"] == {"done": 3}, json.dumps(report, indent=1)
    pngs = sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".png")
    assert pngs == ["a.png", "b.png", "c.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == pngs + ["facemend_api_report.json"]
    job = next(j for j in report["jobs"] if j["input"].endswith(f"{victim_job}.png"))
    assert job["retried"] and job["server"] == steady.url
    assert job["failed_attempts"][0]["server"] == victim.url
    assert any(victim_job in line and victim.url in line for line in report["retries"]), report["retries"]
    assert next(s for s in report["servers"] if s["url"] == victim.url)["unavailable"]
    # Exactly once on the surviving server too: one prompt per job it finished.
    done_on_steady = [j for j in report["jobs"] if j["server"] == steady.url]
    ours = [h for h in get_json(steady.url + "/history").values()
            if h["prompt"][3].get("client_id") == runner.servers[1].client_id]
    assert len(ours) == len(done_on_steady)
