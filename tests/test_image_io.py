"""Robust loading: every odd file is converted to upright 8-bit RGB or refused with its name."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from resim_d2.data.image_io import ImageLoadError, is_image_file, load_rgb_image


def _gradient(h=60, w=90):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)


def _jpeg_bytes(array, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def write_bad_files(root) -> dict[str, str]:
    """Unusable files: name -> path. All must raise ImageLoadError."""
    os.makedirs(root, exist_ok=True)
    good = _jpeg_bytes(_gradient(120, 160))
    noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    contents = {
        "empty.jpg": b"",
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + noise,
        "truncated.jpg": good[: len(good) // 2],
        "text.png": b"this is not an image\n",
        "truncated.png": _png_bytes(_gradient())[:200],
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = os.path.join(root, name)
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


def _png_bytes(array, mode=None):
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, "PNG")
    return buf.getvalue()


def write_convertible_files(root) -> dict[str, str]:
    """Files that must load (converted): name -> path."""
    os.makedirs(root, exist_ok=True)
    rgb = _gradient()
    gray = rgb[..., 0]
    files = {}

    def save(name, image, **kw):
        files[name] = os.path.join(root, name)
        image.save(files[name], **kw)

    save("rgb.jpg", Image.fromarray(rgb), quality=95)
    save("gray.png", Image.fromarray(gray))
    save("bilevel.png", Image.fromarray(gray > 127))
    save("cmyk.jpg", Image.new("CMYK", (40, 30), (0, 255, 255, 0)), quality=95)
    save("rgba.png", Image.fromarray(np.dstack([rgb, np.full(gray.shape, 100, np.uint8)])))
    save("la.png", Image.fromarray(np.dstack([gray, gray]), "LA"))
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("palette_transparent.png", palette, transparency=0)
    save("gray16.png", Image.fromarray(gray.astype(np.uint16) * 257))
    save("float.tiff", Image.fromarray(gray.astype(np.float32) / 255.0))
    save("tiny.png", Image.fromarray(rgb[:1, :1]))
    save("wide.png", Image.fromarray(np.repeat(rgb[:2], 10, axis=1)))  # 2 x 900
    save("tall.png", Image.fromarray(np.repeat(rgb[:, :2], 10, axis=0)))  # 600 x 2
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    save("exif_rot90.jpg", Image.fromarray(rgb), quality=95, exif=exif.tobytes())
    exif[0x0112] = 3  # rotate 180 degrees
    save("exif_rot180.jpg", Image.fromarray(rgb), quality=95, exif=exif.tobytes())
    return files


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
    Image.fromarray(_gradient(100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="too large"):
        load_rgb_image(path)


def test_every_mode_converts_to_rgb(tmp_path):
    files = write_convertible_files(str(tmp_path))
    rgb, gray = _gradient(), _gradient()[..., 0].astype(np.float64)
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
    rgb = _gradient().astype(np.float64)
    rot90 = np.asarray(load_rgb_image(files["exif_rot90.jpg"])).astype(np.float64)
    rot180 = np.asarray(load_rgb_image(files["exif_rot180.jpg"])).astype(np.float64)
    # independent expectation: orientation 6 displays the stored pixels turned 90 degrees clockwise
    assert rot90.shape == (90, 60, 3)
    assert np.abs(rot90 - np.rot90(rgb, k=-1)).mean() < 3
    assert np.abs(rot180 - rgb[::-1, ::-1]).mean() < 3


def test_image_extensions():
    assert is_image_file("a/b/C.JPEG") and is_image_file("x.png") and is_image_file("y.webp")
    assert not is_image_file("labels.txt") and not is_image_file("archive.tar")
