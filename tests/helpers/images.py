"""Image files for the data-loading tests: unusable files, files that load only after conversion,
and a folder of readable and unreadable images with a spy on which files a mapper rejects."""

import io
import os

import numpy as np
from PIL import Image


def gradient_image(h=60, w=90):
    """An (h, w, 3) uint8 RGB image of ramps, different in every channel."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)


def jpeg_bytes(array, **kw):
    """``array`` encoded as a JPEG file's bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def write_bad_files(root) -> dict[str, str]:
    """Unusable files: name -> path. All must raise ImageLoadError."""
    os.makedirs(root, exist_ok=True)
    good = jpeg_bytes(gradient_image(120, 160))
    noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    contents = {
        "empty.jpg": b"",
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + noise,
        "truncated.jpg": good[: len(good) // 2],
        "text.png": b"this is not an image\n",
        "truncated.png": png_bytes(gradient_image())[:200],
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = os.path.join(root, name)
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


def png_bytes(array, mode=None):
    """``array`` encoded as a PNG file's bytes (in PIL ``mode`` if given)."""
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, "PNG")
    return buf.getvalue()


def write_convertible_files(root) -> dict[str, str]:
    """Files that must load (converted): name -> path."""
    os.makedirs(root, exist_ok=True)
    rgb = gradient_image()
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


BAD = {"empty.jpg": b"", "notes.jpg": b"not an image\n", "cut.png": None}


def image_folder(root, good=5):
    """``good`` readable images and the three unreadable files of BAD, in one folder."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        arr = rng.integers(0, 255, (60 + 10 * i, 80, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(root, f"good{i}.png"))
    for name, data in BAD.items():
        if data is None:  # a PNG cut short
            data = open(os.path.join(root, "good0.png"), "rb").read()[:200]
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    files = sorted(os.listdir(root))
    return [{"file_name": os.path.join(root, f), "image_id": i} for i, f in enumerate(files)]


class Spy:
    """Wraps a mapper; remembers each file it rejected (the reference count)."""

    def __init__(self, mapper):
        self.mapper, self.rejected = mapper, []

    def __call__(self, record, rng):
        out = self.mapper(record, rng)
        if out is None:
            self.rejected.append(record["file_name"])
        return out
