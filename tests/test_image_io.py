"""Robust loading: every odd file is converted to upright 8-bit RGB or refused with its name."""

import numpy as np
import pytest
from helpers.images import gradient_image, write_bad_files, write_convertible_files
from PIL import Image

from resim_d2.data.image_io import ImageLoadError, is_image_file, load_rgb_image


@pytest.mark.parametrize(
    "name", ["empty.jpg", "corrupt.jpg", "truncated.jpg", "text.png", "truncated.png"]
)
def test_unusable_files_raise_with_their_name(tmp_path, name):
    path = write_bad_files(str(tmp_path))[name]
    with pytest.raises(ImageLoadError, match=name):
        load_rgb_image(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.jpg"):
        load_rgb_image(str(tmp_path / "nope.jpg"))


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = str(tmp_path / "big.png")
    Image.fromarray(gradient_image(100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="too large"):
        load_rgb_image(path)


def test_every_mode_converts_to_rgb(tmp_path):
    files = write_convertible_files(str(tmp_path))
    rgb, gray = gradient_image(), gradient_image()[..., 0].astype(np.float64)
    loaded = {name: load_rgb_image(path) for name, path in files.items()}
    for name, image in loaded.items():
        assert image.mode == "RGB", name
        assert np.asarray(image).dtype == np.uint8
    arr = {name: np.asarray(image).astype(np.float64) for name, image in loaded.items()}
    assert np.abs(arr["rgb.jpg"] - rgb).mean() < 3
    for name in ("gray.png", "la.png", "float.tiff", "gray16.png"):
        assert np.abs(arr[name] - gray[..., None]).max() <= 1, name  # 16-bit scaled, not clipped
    assert set(np.unique(arr["bilevel.png"])) <= {0.0, 255.0}
    np.testing.assert_allclose(arr["cmyk.jpg"].mean((0, 1)), [255, 0, 0], atol=3)  # CMYK red
    np.testing.assert_array_equal(arr["rgba.png"], rgb)  # alpha dropped, as torchvision
    assert loaded["tiny.png"].size == (1, 1)
    assert loaded["wide.png"].size == (900, 2) and loaded["tall.png"].size == (2, 600)


def test_exif_orientation_is_applied(tmp_path):
    files = write_convertible_files(str(tmp_path))
    rgb = gradient_image().astype(np.float64)
    rot90 = np.asarray(load_rgb_image(files["exif_rot90.jpg"])).astype(np.float64)
    rot180 = np.asarray(load_rgb_image(files["exif_rot180.jpg"])).astype(np.float64)
    # independent expectation: orientation 6 displays the stored pixels turned 90 degrees clockwise
    assert rot90.shape == (90, 60, 3)
    assert np.abs(rot90 - np.rot90(rgb, k=-1)).mean() < 3
    assert np.abs(rot180 - rgb[::-1, ::-1]).mean() < 3


def test_image_extensions():
    assert is_image_file("a/b/C.JPEG") and is_image_file("x.png") and is_image_file("y.webp")
    assert not is_image_file("labels.txt") and not is_image_file("archive.tar")
