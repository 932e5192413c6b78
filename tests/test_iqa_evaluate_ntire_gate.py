"""`evaluate --id-model adaface_ir50_ms1mv2.ckpt --protocol ntire2025|ntire2026 [--landmarks CSV]` on a folder
laid out like the challenge's test set: the per-image ID similarity, each image's subset and threshold, the low
count and the verdict, as the organisers' eval.py + inference_face compute them (official AdaFace code, random
weights in the official checkpoint layout)."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from facemend.cli import main
from facemend.ops import quality as N
from facemend.pipelines.quality import adaface as AF
from facemend.pipelines.quality.ntire_score import PROTOCOLS

from adaface_official import organisers_crop, organisers_similarity, random_official_ir50, save_lightning_checkpoint
from conftest import modules_reorder_tol, need_shared

pytestmark = pytest.mark.usefixtures("one_thread")

HEADER = ["filename", "dataset", "x1", "y1", "x2", "y2", "left_eye_x", "left_eye_y", "right_eye_x", "right_eye_y",
          "nose_x", "nose_y", "mouth_left_x", "mouth_left_y", "mouth_right_x", "mouth_right_y"]
# Two rows of the organisers' own file (zhengchen1999/NTIRE2025_RealWorld_Face_Restoration face_alignment/
# test_face.csv @ b06055c): WIDER-Test images 0412 and 0240, which ../shared/faces/aligned_lq_real also holds.
ORGANISERS_ROWS = [
    "0412,Wider-Test,109.9779884815216,105.61268770694733,394.6429809778929,442.945968747139,193.52457,242.10179,"
    "322.06326,242.09256,257.77347,280.27856,205.99858,367.26022,309.2445,367.03583",
    "0240,Wider-Test,115.96762436628342,106.17767467349768,389.0348930358887,450.310159554705,189.91249,238.51541,"
    "321.28897,235.11795,254.49014,314.99936,192.17368,363.72528,326.53433,357.59567"]
# Two more inputs in other subsets, with the FFHQ template's points (these crops are FFHQ-aligned).
OWN_ROWS = [("0143", "WebPhoto-Test"), ("0342", "CelebA")]


def _degrade(u8: np.ndarray, how: str, noise: float = 60.0) -> np.ndarray:
    x = torch.from_numpy(u8).permute(2, 0, 1)[None].float()
    if how == "blur":
        x = torch.nn.functional.avg_pool2d(x, 9, stride=1, padding=4, count_include_pad=False)
    elif how == "mirror":
        x = x.flip(-1)
    elif how == "noise":
        x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * noise
    return x.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def _centre_embeddings(net, crops):
    """Random weights map every face to nearly one direction (similarities 0.8-1 whatever the change); the final
    BatchNorm's statistics set from these crops' features spread them, so the thresholds separate the images."""
    x = torch.tensor(np.stack([((c[:, :, ::-1] / 255.0) - 0.5) / 0.5 for c in crops]))
    x = x.permute(0, 3, 1, 2).float().contiguous()
    with torch.no_grad():
        f = net.output_layer[:4](net.body(net.input_layer(x)))
        net.output_layer[4].running_mean.copy_(f.mean(0))
        net.output_layer[4].running_var.copy_(f.var(0) + 1e-3)


def _noise_between(net, lq, points, low, high):
    """An output of `lq` (noise of some strength) whose official similarity lies in (low, high): bisection on
    the noise strength (the similarity falls as it grows)."""
    def embed(u8):  # inference_face's crop + to_input + model, as organisers_similarity
        crop = organisers_crop(u8, points)
        with torch.no_grad():
            return net(torch.tensor(((crop[:, :, ::-1] / 255.0) - 0.5) / 0.5).permute(2, 0, 1)[None].float())[0]

    ref, a, b = embed(lq), 0.0, 200.0
    for _ in range(30):
        mid = (a + b) / 2
        out = _degrade(lq, "noise", mid)
        sim = (ref @ embed(out).T).item()
        if low < sim < high:
            return out
        a, b = (mid, b) if sim >= high else (a, mid)
    raise AssertionError(f"no noise strength gives a similarity in ({low}, {high})")


@pytest.fixture(scope="module")
def challenge(tmp_path_factory):
    """models/adaface/adaface_ir50_ms1mv2.ckpt; lq/test/<subset>/<name>.png; out/<subset>/<name>.png; the CSV.
    Outputs: 0412 unchanged, 0342 blurred, 0143 mirrored, 0240 (WIDER) noisy to a similarity between 2026's
    threshold 0.2 and 2025's 0.3, so the two years' gates differ on it."""
    from facemend.pipelines.face.geometry import face_template

    root = tmp_path_factory.mktemp("ntire")
    ffhq = [repr(float(v)) for v in face_template(512).flatten()]
    rows = [r.split(",") for r in ORGANISERS_ROWS] + [
        [name, subset, "0", "0", "512", "512"] + ffhq for name, subset in OWN_ROWS]
    with open(root / "test_face.csv", "w", newline="") as f:
        csv.writer(f).writerows([HEADER] + rows)
    faces = {r[0]: (np.array(Image.open(need_shared("faces", "aligned_lq_real", f"{r[0]}.png")).convert("RGB")),
                    np.array([float(v) for v in r[6:]]).reshape(5, 2), r[1]) for r in rows}
    net = random_official_ir50(seed=1)
    _centre_embeddings(net, [organisers_crop(_degrade(lq, how), p) for lq, p, _ in faces.values()
                             for how in ("same", "mirror", "blur", "noise")])
    outs = {"0412": _degrade(faces["0412"][0], "same"), "0342": _degrade(faces["0342"][0], "blur"),
            "0143": _degrade(faces["0143"][0], "mirror"),
            "0240": _noise_between(net, faces["0240"][0], faces["0240"][1], 0.22, 0.28)}
    (root / "models" / "adaface").mkdir(parents=True)
    save_lightning_checkpoint(net, root / "models" / "adaface" / AF.CHECKPOINT_FILE)
    expected = {}
    for name, (lq, points, subset) in faces.items():
        (root / "lq" / "test" / subset).mkdir(parents=True, exist_ok=True)
        (root / "out" / subset).mkdir(parents=True, exist_ok=True)
        shutil.copy(need_shared("faces", "aligned_lq_real", f"{name}.png"), root / "lq" / "test" / subset)
        Image.fromarray(outs[name]).save(root / "out" / subset / f"{name}.png")
        # the organisers read both files back: PNG is lossless, so the arrays above are what they read
        expected[name] = (subset, organisers_similarity(net, lq, outs[name], points))
    # two embeddings in a dot product, batched here and one by one there: their float32 reordering, measured
    crops = AF.crops_to_input(np.stack([organisers_crop(im, p) for name, (lq, p, _) in faces.items()
                                        for im in (lq, outs[name])]))
    tol = 2 * modules_reorder_tol(lambda m, t: m(t)[0], net, crops)
    N._cache.clear()
    yield root, expected, tol
    N._cache.clear()


def _run(root, capsys, *extra):
    report_dir = root / ("report" + "_".join(extra).replace("-", "").replace("/", "_")[-40:])
    code = main(["--models-dir", str(root / "models"), "--device", "cpu", "evaluate", str(root / "out"), "--inputs",
                 str(root / "lq" / "test"), "-o", str(report_dir), "--metrics", "",
                 "--id-model", AF.CHECKPOINT_FILE, *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads((report_dir / "report.json").read_text()), out.out, report_dir


@pytest.mark.parametrize("year", ["ntire2025", "ntire2026"])
def test_gate_with_the_landmark_file_is_the_organisers(challenge, capsys, year):
    root, expected, tol = challenge
    report, printed, report_dir = _run(root, capsys, "--protocol", year, "--landmarks", str(root / "test_face.csv"))
    rows = {os.path.basename(r["file"]).split(".")[0]: r for r in report["per_image"]}
    thresholds = PROTOCOLS[year]["thresholds"]
    # per image: the organisers' similarity (within float32 reordering), subset from the CSV, its threshold
    for name, (subset, sim) in expected.items():
        r = rows[name]
        assert r["dataset"] == subset and r["landmarks"] == "file"
        assert abs(r["id_sim"] - sim) <= tol
        assert r["id_threshold"] == thresholds[subset]
        assert r["low_id"] == (sim < thresholds[subset])  # strict, as eval.py
    low = sum(sim < thresholds[subset] for subset, sim in expected.values())
    assert report["id_gate"]["low_count"] == low and report["id_gate"]["passed"] == (low <= 10)
    assert report["id_model"]["as_the_challenge"] and report["id_model"]["file"] == AF.CHECKPOINT_FILE
    assert report["protocol"]["name"] == year and report["protocol"]["id_thresholds"] == thresholds
    assert f"{year} ID gate (AdaFace IR-50): {low} low" in printed
    assert (report_dir / "summary.png").stat().st_size > 0
    # the unchanged copy is the same face; the noisy WIDER face is low in 2025 (< 0.3) and passes in 2026 (0.2)
    assert rows["0412"]["id_sim"] == pytest.approx(1.0, abs=1e-5)
    assert rows["0240"]["low_id"] == (year == "ntire2025")


def test_years_differ_only_in_wider_and_webphoto_thresholds():
    y25, y26 = PROTOCOLS["ntire2025"]["thresholds"], PROTOCOLS["ntire2026"]["thresholds"]
    assert {k for k in y25 if y25[k] != y26[k]} == {"Wider-Test", "WebPhoto-Test"}
    assert (y26["Wider-Test"], y26["WebPhoto-Test"]) == (0.2, 0.25)
    assert PROTOCOLS["ntire2025"]["max_low"] == PROTOCOLS["ntire2026"]["max_low"] == 10


def test_without_the_landmark_file_the_detector_finds_the_inputs_faces(challenge, capsys):
    root, expected, _ = challenge
    report, printed, _ = _run(root, capsys)
    assert "embedded MTCNN detector" in printed
    assert report["id_gate"]["landmarks"] == {"detector": 4}
    rows = {os.path.basename(r["file"]).split(".")[0]: r for r in report["per_image"]}
    # subsets from the folders (no CSV); similarities close to the CSV-landmark ones but not the same warp
    assert {n: r["dataset"] for n, r in rows.items()} == {n: s for n, (s, _) in expected.items()}
    assert rows["0412"]["id_sim"] == pytest.approx(1.0, abs=1e-5)


def test_landmark_file_errors_name_the_file_and_the_image(challenge, capsys, tmp_path):
    root = challenge[0]
    bad = tmp_path / "marks.csv"
    bad.write_text("filename,dataset,left_eye_x\n0412,Wider-Test,1\n")
    code = main(["--models-dir", str(root / "models"), "evaluate", str(root / "out"), "--inputs",
                 str(root / "lq" / "test"), "-o", str(tmp_path / "r"), "--metrics", "", "--id-model",
                 AF.CHECKPOINT_FILE, "--landmarks", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "marks.csv is not an NTIRE landmark file" in err and "left_eye_y" in err
    short = tmp_path / "short.csv"
    short.write_text(",".join(HEADER) + "\n" + ORGANISERS_ROWS[0] + "\n")
    code = main(["--models-dir", str(root / "models"), "evaluate", str(root / "out"), "--inputs",
                 str(root / "lq" / "test"), "-o", str(tmp_path / "r"), "--metrics", "", "--id-model",
                 AF.CHECKPOINT_FILE, "--landmarks", str(short)])
    err = capsys.readouterr().err
    assert code == 2 and "is not in the landmark file" in err
    assert not (tmp_path / "r" / "report.json").exists()
