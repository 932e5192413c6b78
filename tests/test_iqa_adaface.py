"""AdaFace IR-50 and the NTIRE organisers' alignment (pipelines/quality/adaface.py) against the official code:
the network on random weights saved in the official checkpoint layout, the similarity transform and the crops on
real photos, and the whole per-image similarity as the organisers' inference_face computes it."""
import numpy as np
import pytest
import torch

from facemend.pipelines.io.errors import ModelFileInvalid
from facemend.pipelines.quality import adaface as AF

from adaface_official import (official_modules, organisers_crop, organisers_similarity, random_official_ir50,
                              save_lightning_checkpoint)
from conftest import load_image, modules_reorder_tol, need_shared

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def official_net():
    return random_official_ir50(seed=0)


@pytest.fixture(scope="module")
def checkpoint(official_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("adaface") / AF.CHECKPOINT_FILE
    save_lightning_checkpoint(official_net, path)
    return path


@pytest.fixture(scope="module")
def pair_tol(official_net):
    """Tolerance for a dot product of two embeddings of real 112 crops (ours batched, the official one by one):
    twice the float32 reordering error of the network on such crops, measured once against a float64 run."""
    img, u8 = _photo()
    pts = _landmarks(img)
    x = AF.crops_to_input(AF.ntire_crops([u8, u8[:, ::-1]], np.stack([pts, pts])))
    return 2 * modules_reorder_tol(lambda m, t: m(t)[0], official_net, x)


def test_ir50_equals_official_network_on_random_weights(official_net, checkpoint):
    ours = AF.AdaFaceIR50.from_file(str(checkpoint))
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        ref_emb, ref_norm = official_net(x)
    emb = ours.embed_input(x)
    # the ArcFace-style entry (RGB in [0,1]) is the same network on the same pixels
    assert torch.equal(ours.embed((x.flip(1) + 1) / 2), ours.embed_input(((x.flip(1) + 1) / 2).flip(1) * 2 - 1))
    # the same layers in the same order: equal up to float32 reordering (measured against a float64 run)
    tol = modules_reorder_tol(lambda m, t: m(t)[0], official_net, x)
    assert (emb - ref_emb).abs().max().item() <= tol
    assert torch.allclose(ours.net(x)[1], ref_norm, rtol=1e-5)
    # the two faces differ, so the check above is not two constant vectors
    assert (emb[0] @ emb[1]).abs().item() < 0.99


def test_checkpoint_with_missing_key_or_foreign_objects_is_refused_naming_the_file(official_net, tmp_path):
    bad = tmp_path / "bad.ckpt"
    sd = {"model." + k: v for k, v in official_net.state_dict().items() if k != "body.3.res_layer.1.weight"}
    torch.save({"state_dict": sd}, bad)
    with pytest.raises(ModelFileInvalid, match=r"bad\.ckpt.*missing.*body\.3\.res_layer\.1\.weight"):
        AF.load_adaface(str(bad))
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "callback": torch.nn.ReLU()}, evil)  # a class outside
    # the allow-list: refused while unpickling, before any key is looked at
    with pytest.raises(ModelFileInvalid, match=r"evil\.ckpt holds Python objects other than weights"):
        AF.load_adaface(str(evil))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"garbage" * 10)  # e.g. an HTML page saved under the checkpoint's name
    with pytest.raises(ModelFileInvalid, match=r"Cannot read model file .*junk\.ckpt.*corrupt, truncated"):
        AF.load_adaface(str(junk))


def _photo(name=("aligned_lq_real", "Adele_crop.png")):
    img = load_image(need_shared("faces", *name))[0]
    return img, AF.to_uint8_hwc(img)


def _landmarks(img):
    from facemend.pipelines.face.detectors import load_detector

    det = load_detector("mtcnn").detect(img[None], score_threshold=0.8)[0]
    return det[0, 5:15].reshape(5, 2).double().numpy()


def test_transform_and_crops_equal_the_organisers_code_on_real_photos():
    _, align_trans, cp2tform = official_modules()

    ref = np.float32(align_trans.get_reference_facial_points(default_square=True))
    assert AF.REFERENCE_112.tobytes() == ref.tobytes()
    img, u8 = _photo()
    pts = _landmarks(img)
    rng = np.random.default_rng(0)
    cases = [pts, pts + rng.normal(0, 3, (5, 2)), pts[[1, 0, 2, 4, 3]],  # detected; jittered; left/right swapped
             pts * 0.5 + 40, pts + rng.normal(0, 25, (5, 2))]
    reflective = []
    for p in cases:
        m = AF.ntire_transform(p)
        np.testing.assert_array_equal(m, cp2tform.get_similarity_transform_for_cv2(np.float32(p), ref.copy()))
        np.testing.assert_array_equal(AF.ntire_crops([u8], p[None])[0], organisers_crop(u8, p))
        reflective.append(bool(np.linalg.det(m[:, :2]) < 0))
    # the swapped points take the mirror-image fit, as the organisers' code does; the detected ones do not
    assert reflective[0] is False and reflective[2] is True


def test_similarity_equals_organisers_inference_face(official_net, checkpoint, pair_tol):
    ours = AF.AdaFaceIR50.from_file(str(checkpoint))
    img, out_u8 = _photo()
    pts = _landmarks(img)
    lq = torch.nn.functional.avg_pool2d(img[None], 5, stride=1, padding=2, count_include_pad=False)[0]
    lq_u8 = AF.to_uint8_hwc(lq)
    lq = torch.from_numpy(lq_u8).permute(2, 0, 1).float() / 255  # what read_image gives for the saved 8-bit input
    out = torch.from_numpy(out_u8).permute(2, 0, 1).float() / 255
    sim = ours.similarity(torch.stack([lq, out]), torch.stack([out, out]),
                          torch.from_numpy(np.stack([pts, pts])))
    ref = organisers_similarity(official_net, lq_u8, out_u8, pts)
    tol = pair_tol
    assert abs(sim[0].item() - ref) <= tol
    assert abs(sim[1].item() - 1.0) <= tol  # a face against itself
    assert sim[0].item() < 1 - 10 * tol  # the blur moved the embedding: the comparison is not vacuous


def test_nodes_load_adaface_and_gate_faces_by_the_protocol_subset(official_net, checkpoint, pair_tol, tmp_path):
    """The loader node lists and loads models/adaface/adaface_ir50_ms1mv2.ckpt; the ID similarity node on aligned
    crops (landmarks: the FFHQ template) gives the organisers' number and applies the year's subset threshold."""
    import json
    import shutil

    from facemend.host import model_paths
    from facemend.ops import quality as N
    from facemend.pipelines.face.geometry import face_template

    (tmp_path / "adaface").mkdir()
    shutil.copy(checkpoint, tmp_path / "adaface" / AF.CHECKPOINT_FILE)
    model_paths.set_models_dirs([str(tmp_path)])
    N._cache.clear()
    try:
        assert AF.CHECKPOINT_FILE in N.id_model_files()  # the loader node's choices
        idm = N.load_id_model(AF.CHECKPOINT_FILE)[0]
        img, u8 = _photo()
        blurred = torch.nn.functional.avg_pool2d(img[None], 9, stride=1, padding=4, count_include_pad=False)
        blurred_u8 = AF.to_uint8_hwc(blurred[0])
        pair = torch.stack([img, torch.from_numpy(blurred_u8).permute(2, 0, 1).float() / 255])
        faces = pair.permute(0, 2, 3, 1).contiguous()
        mean, low, report = N.id_similarity(faces[:1], faces[1:], idm, protocol="ntire2026", subset="Wider-Test")
        report = json.loads(report)
        pts = face_template(512).double().numpy()
        ref = organisers_similarity(official_net, u8, blurred_u8, pts)
        assert abs(mean - ref) <= pair_tol
        assert report["model_kind"] == "AdaFace IR-50" and report["as_the_challenge"]
        assert report["threshold"] == 0.2 and report["protocol"] == "ntire2026" and report["passed"] == (low <= 10)
        assert low == int(mean < 0.2)
        _, _, custom = N.id_similarity(faces[:1], faces[1:], idm, threshold=0.7)
        assert json.loads(custom)["threshold"] == 0.7 and "protocol" not in json.loads(custom)
    finally:
        model_paths.set_models_dirs([])
        N._cache.clear()


def test_restorerid_refuses_adaface_embeddings(checkpoint):
    """RestorerID's ID tokens are learnt on ArcFace embeddings: an AdaFace model wired there is refused, not used."""
    from facemend.pipelines.identity.reference import reference_identity
    from facemend.pipelines.io.errors import FaceMendError

    with pytest.raises(FaceMendError, match="RestorerID needs an ArcFace model.*w600k_r50.onnx"):
        reference_identity(torch.rand(1, 3, 64, 64), detector=None, arcface=AF.AdaFaceIR50.from_file(str(checkpoint)))


def test_output_of_another_size_is_warped_with_the_points_scaled_to_it(official_net, checkpoint, pair_tol):
    """An x2 output: each 8-bit image warped at its own size, the output with the input's points times 2 (the
    organisers' code has only same-size pairs; this is the same warp applied to each file)."""
    ours = AF.AdaFaceIR50.from_file(str(checkpoint))
    img, u8 = _photo()
    pts = _landmarks(img)
    big = torch.nn.functional.interpolate(img[None], scale_factor=2, mode="bilinear", align_corners=False)[0]
    big_u8 = AF.to_uint8_hwc(big)
    lq = torch.from_numpy(u8).permute(2, 0, 1).float()[None] / 255
    out = torch.from_numpy(big_u8).permute(2, 0, 1).float()[None] / 255
    sim = ours.similarity(lq, out, torch.from_numpy(pts)[None], torch.from_numpy(pts * 2)[None])
    to_input = AF.crops_to_input(np.stack([organisers_crop(u8, pts), organisers_crop(big_u8, pts * 2)]))
    with torch.no_grad():
        e = official_net(to_input)[0]
    assert abs(sim.item() - (e[0] @ e[1]).item()) <= pair_tol
    assert sim.item() > 0.9  # the same face at twice the size, not another crop of it
