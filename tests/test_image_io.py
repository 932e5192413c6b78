"""Reading odd image files and validating tensors: each has a defined behaviour."""
import numpy as np
import pytest
import torch
from PIL import Image

from facemend.pipelines.io.errors import InvalidImage
from facemend.pipelines.io.images import check_images, read_image, write_image

from conftest import rounding_bound


def test_grayscale_becomes_rgb(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray((np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)).save(p)
    img, alpha = read_image(str(p))
    assert img.shape == (1, 3, 8, 8) and alpha is None
    assert torch.equal(img[:, 0], img[:, 1]) and torch.equal(img[:, 1], img[:, 2])


def test_rgba_keeps_alpha_apart(tmp_path):
    p = tmp_path / "a.png"
    arr = np.zeros((5, 6, 4), np.uint8)
    arr[..., 0], arr[..., 3] = 200, 128
    Image.fromarray(arr, "RGBA").save(p)
    img, alpha = read_image(str(p))
    assert img.shape == (1, 3, 5, 6) and alpha.shape == (1, 1, 5, 6)
    # One division (and a mean over the 30 alpha values) in float32 against the exact fraction.
    assert abs(float(img[0, 0, 0, 0]) - 200 / 255) <= rounding_bound(1, evaluations=1)
    assert abs(float(alpha.mean()) - 128 / 255) <= rounding_bound(30 + 1, evaluations=1)
    out = tmp_path / "o.png"
    write_image(str(out), img, alpha)
    assert Image.open(out).mode == "RGBA"


def test_palette_with_transparency(tmp_path):
    p = tmp_path / "p.png"
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.info["transparency"] = 0
    im.save(p, transparency=0)
    img, _ = read_image(str(p))
    assert img.shape == (1, 3, 4, 4) and float(img[0, 0].mean()) == 1.0


def test_16bit_grayscale_and_colour_keep_precision(tmp_path):
    g = np.full((4, 4), 40000, np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    img, _ = read_image(str(tmp_path / "g16.png"))
    assert abs(float(img[0, 0, 0, 0]) - 40000 / 65535) <= rounding_bound(1, evaluations=1)
    cv2 = pytest.importorskip("cv2")
    c = np.zeros((3, 5, 3), np.uint16)
    c[..., 2] = 1000  # red in OpenCV's BGR order; 1000/65535 is below one 8-bit step
    cv2.imwrite(str(tmp_path / "c16.png"), c)
    img, _ = read_image(str(tmp_path / "c16.png"))
    assert img.shape == (1, 3, 3, 5)
    assert abs(float(img[0, 0, 0, 0]) - 1000 / 65535) <= rounding_bound(1, evaluations=1)
    assert float(img[0, 2].max()) == 0.0


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "one.png")
    img, _ = read_image(str(tmp_path / "one.png"))
    assert img.shape == (1, 3, 1, 1)


def test_broken_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InvalidImage, match="broken.jpg"):
        read_image(str(bad))
    with pytest.raises(InvalidImage, match="nothere.png"):
        read_image(str(tmp_path / "nothere.png"))


def test_nan_and_inf_are_rejected_with_the_batch_item():
    x = torch.rand(3, 3, 4, 4)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidImage, match=r"NaN.*\[1\]"):
        check_images(x)
    x[1, 0, 0, 0] = float("inf")
    with pytest.raises(InvalidImage, match="NaN or Inf"):
        check_images(x)


def test_out_of_range_values_are_clamped_and_wrong_shapes_refused():
    assert check_images(torch.full((1, 3, 2, 2), 1.2)).max() == 1.0
    with pytest.raises(InvalidImage, match="expected"):
        check_images(torch.rand(3, 4, 4))
    with pytest.raises(InvalidImage, match="empty"):
        check_images(torch.rand(0, 3, 4, 4))
