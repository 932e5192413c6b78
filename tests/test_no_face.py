"""Zero faces (issue 11 item 12): Detect + Align hands on an empty crop batch, every face node passes it on
without running its network, and Paste Back returns the photo untouched -- in process with the shipped graphs'
node chain, and through /prompt in a real ComfyUI with the shipped fast workflow (byte-identical file)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from node_specs import node_op


class NeverRun:
    """A restorer / one-step model / metric that fails the test if any node asks it for work."""
    device = torch.device("cpu")
    name = "never"
    lower_better = False

    def __getattr__(self, item):
        raise AssertionError(f"a face node used its model ({item}) although there is no face")

    def __call__(self, *a, **k):
        raise AssertionError("a face node ran its model although there is no face")


@pytest.mark.parametrize("size", [(1, 1), (48, 64)])
@pytest.mark.parametrize("geometry", ["ffhq", "native"])
def test_no_face_costs_nothing_and_passes_through(size, geometry):
    image = torch.rand(1, *size, 3)
    detector = node_op("FaceMend_DetectorLoader")("mtcnn (embedded)")[0]
    crops, alignment, count, _ = node_op("FaceMend_DetectAlign")(image, detector, crop_geometry=geometry)
    assert count == 0 and crops.shape[0] == 0 and crops.ndim == 4 and crops.shape[-1] == 3
    never = NeverRun()
    restored, = node_op("FaceMend_RestoreFaces")(crops, never)
    tuned, report = node_op("FaceMend_PerImageTune")(crops, "zssr", 2, steps=5)
    assert tuned.shape[0] == 0 and json.loads(report)["faces"] == 0
    refined, = node_op("FaceMend_OneStepSR")(restored, never, scale=1)
    fixed, = node_op("FaceMend_ColorFix")(refined, crops)
    assert restored.shape[0] == refined.shape[0] == fixed.shape[0] == 0
    out, mask = node_op("FaceMend_PasteBack")(image, fixed, alignment)
    assert torch.equal(out, image) and mask.shape == image.shape[:3] and not mask.any()
    # The quality nodes on no faces: no work, outputs of the right types.
    score, _ = node_op("FaceMend_IQAScore")(crops, never)
    sim, low, _ = node_op("FaceMend_IDSimilarity")(crops, restored, never)
    best, _ = node_op("FaceMend_BestOf")(crops, restored, never)
    fx, ffx, gain, drift, _ = node_op("FaceMend_Authenticity")(crops, never, never)
    assert (score, sim, low, gain, drift) == (0.0, 0.0, 0, 0.0, 0.0)
    assert best.shape[0] == fx.shape[0] == ffx.shape[0] == 0
    # The identity and adaptation nodes too.
    restored_id, report = node_op("FaceMend_RestorerIDRestore")(crops, never, image, detector, never)
    targets, plain = node_op("FaceMend_PseudoTargets")(crops, never, never)
    assert restored_id.shape[0] == targets.shape[0] == plain.shape[0] == 0 and json.loads(report)["faces"] == 0


@pytest.mark.comfyui
def test_fast_workflow_with_no_face_in_comfyui(comfyui):
    """The shipped fast workflow (unchanged) on a photo without a face and on a 1x1 image: both succeed and the
    saved picture is the input itself (the 1x1 image used to fail in Restore Faces); the node previews reach the
    host's history."""
    from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean
    from test_comfyui_e2e import run_prompt

    url, base = comfyui
    (base / "models" / "facerestore_models").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = GFPGANv1Clean(GFPGANConfig(out_size=64, num_style_feat=64, narrow=0.25))
    torch.save({"params_ema": net.state_dict()}, base / "models" / "facerestore_models" / "GFPGANv1.4.pth")
    shipped = (ROOT / "workflows" / "api" / "facemend_fast.json").read_text()
    rng = np.random.default_rng(0)
    for name, pixels in (("noface.png", np.full((60, 80, 3), 128, np.uint8)),
                         ("one.png", rng.integers(0, 255, (1, 1, 3), dtype=np.uint8))):
        Image.fromarray(pixels).save(base / "input" / name)
        graph = json.loads(shipped)
        graph["1"]["inputs"]["image"] = name
        entry = run_prompt(url, graph, client_id="facemend-noface")
        # The saved picture (the nodes' own previews are temp images beside it).
        (img,) = [i for out in entry["outputs"].values() for i in out.get("images", []) if i["type"] == "output"]
        result = np.asarray(Image.open(base / "output" / img["subfolder"] / img["filename"]).convert("RGB"))
        assert np.array_equal(result, pixels), name
        # On the nodes: Paste Back's before | after (the same photo twice here); Detect + Align has no crop to show.
        ids = {n["class_type"]: nid for nid, n in graph.items()}
        (pair,) = entry["outputs"][ids["FaceMend_PasteBack"]]["images"]
        shown = np.asarray(Image.open(base / "temp" / pair["subfolder"] / pair["filename"]).convert("RGB"))
        assert pair["type"] == "temp" and shown.shape == (pixels.shape[0], 2 * pixels.shape[1] + 8, 3), name
        assert ids["FaceMend_DetectAlign"] not in entry["outputs"]


from test_comfyui_e2e import comfyui  # noqa: E402,F401  (the server fixture, for the test above)
