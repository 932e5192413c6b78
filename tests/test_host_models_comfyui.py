"""The real ComfyUI server with --lowvram and --novram runs the fast graph; FaceMend's models are in
comfy.model_management.current_loaded_models (loaded on the compute device, offloaded to a different device) and
free_memory evicts them. On a CPU machine ComfyUI's compute and offload devices are both `cpu` and its VRAM flags
are ignored, so a small test-only custom node (written below into the server's custom_nodes/) makes `cpu:0` the
compute device, applies the VRAM state the flag asks for, records every load_models_gpu call and exposes
current_loaded_models and free_memory over HTTP. ComfyUI refuses --lowvram/--novram together with --cpu, and
without --cpu it needs a CUDA device at import: LAUNCH parses the real command line (with the flag), then sets
args.cpu before ComfyUI's main.py runs."""
import json
import os
import sys
import urllib.request

import pytest
import torch

from comfy_servers import ComfyServer, comfyui_missing, free_port, get_json
from conftest import need_shared

pytestmark = pytest.mark.comfyui
PORTS = (int(os.environ.get("FACEMEND_TEST_PORT_LO", "8400")), int(os.environ.get("FACEMEND_TEST_PORT_HI", "8500")))

LAUNCH = ("import runpy, sys; sys.argv[0] = 'main.py'; sys.path.insert(0, '.'); import comfy.options; "
          "comfy.options.enable_args_parsing(); import comfy.cli_args; comfy.cli_args.args.cpu = True; "
          "runpy.run_path('main.py', run_name='__main__')")
PLUGIN = '''
import torch
from aiohttp import web

import comfy.model_management as mm
from comfy.cli_args import args
from server import PromptServer

COMPUTE, OFFLOAD = torch.device("cpu", 0), torch.device("cpu")
mm.get_torch_device = lambda: COMPUTE
mm.unet_offload_device = lambda: OFFLOAD
mm.is_device_cpu = lambda d: getattr(d, "type", d) == "cpu" and getattr(d, "index", 1) is None
mm.lowvram_available = True
mm.vram_state = mm.VRAMState.LOW_VRAM if args.lowvram else mm.VRAMState.NO_VRAM if args.novram else \\
    mm.VRAMState.NORMAL_VRAM
LOG = []
_load = mm.load_models_gpu


def load_models_gpu(models, *a, **k):
    LOG.extend(getattr(getattr(m, "model", None), "model_name", type(m).__name__) for m in models)
    return _load(models, *a, **k)


mm.load_models_gpu = load_models_gpu


def held():
    out = []
    for e in mm.current_loaded_models:
        holder = getattr(e.model, "model", None)
        if type(holder).__name__ == "ModelHolder":
            devices = sorted({str(p.device) for p in holder.parameters()})
            out.append({"name": holder.model_name, "device": str(e.device), "offload": str(e.model.offload_device),
                        "loaded": e.model.loaded_size(), "size": e.model.model_size(), "weights_on": devices})
    return out


@PromptServer.instance.routes.get("/facemend_test/models")
async def models(request):
    return web.json_response({"vram_state": mm.vram_state.name, "held": held(), "loads": LOG})


@PromptServer.instance.routes.post("/facemend_test/free")
async def free(request):
    mm.free_memory(1e30, mm.get_torch_device())
    return web.json_response({"held": held()})


NODE_CLASS_MAPPINGS = {}
'''


def _post(url):
    req = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("flag", ["--lowvram", "--novram"])
def test_fast_graph_models_are_comfyui_models(tmp_path, flag):
    missing = comfyui_missing()
    if missing:
        pytest.skip(missing)
    from facemend.client.workflow import load_workflow
    from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean
    from test_comfyui_e2e import run_prompt

    photo = need_shared("faces", "whole_lq_real", "00.jpg")
    models = tmp_path / "models"
    (models / "facerestore_models").mkdir(parents=True)
    torch.manual_seed(0)
    net = GFPGANv1Clean(GFPGANConfig(out_size=64, num_style_feat=64, narrow=0.25))
    torch.save({"params_ema": net.state_dict()}, models / "facerestore_models" / "GFPGANv1.4.pth")
    base = tmp_path / "comfy"
    (base / "custom_nodes" / "facemend_test_device").mkdir(parents=True)
    (base / "custom_nodes" / "facemend_test_device" / "__init__.py").write_text(PLUGIN)
    (base / "input").mkdir()
    (base / "input" / "example.png").write_bytes(photo.read_bytes())
    server = ComfyServer(base, free_port(*PORTS), models, extra_args=(flag,),
                         command=[sys.executable, "-c", LAUNCH]).wait_ready()
    try:
        graph = load_workflow("fast")
        graph["3"]["inputs"]["crop_size"] = 128
        run_prompt(server.url, graph)
        state = get_json(server.url + "/facemend_test/models")
        assert state["vram_state"] == ("LOW_VRAM" if flag == "--lowvram" else "NO_VRAM")
        names = " ".join(state["loads"])
        assert "FaceRestorer GFPGANv1.4.pth" in names and "detector mtcnn" in names  # loaded by ComfyUI
        if flag == "--novram":  # each node unloads its models when done
            assert state["held"] == []
        else:  # kept on the compute device, offload device distinct, until ComfyUI needs the memory
            held = {h["name"]: h for h in state["held"]}
            assert {"FaceRestorer GFPGANv1.4.pth", "detector mtcnn"} <= set(held)
            assert all(h["device"] == "cpu:0" and h["offload"] == "cpu" and h["loaded"] == h["size"] > 0
                       for h in held.values())
            assert _post(server.url + "/facemend_test/free")["held"] == []
        run_prompt(server.url, graph)  # evicted models come back for the next run
    finally:
        server.stop()
