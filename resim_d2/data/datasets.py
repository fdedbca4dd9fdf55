"""Pre-training datasets in detectron2's DatasetCatalog: ImageNet, IN-100, folders, demo images.

Records are ``{"file_name": path, "image_id": index}`` (ImageNet adds ``"class_id"``, the WordNet
id); listing reads directory entries only, never image files. Roots come from
``$DETECTRON2_DATASETS`` (default ``./datasets``), like detectron2's builtin datasets, and are
resolved when a dataset is listed, so setting the variable after ``import resim_d2`` works.

Registered names:

* ``imagenet_train`` / ``imagenet_val``: ``imagenet/{train,val}/<wnid>/*.JPEG`` (a flat ``val/``
  folder of images also works);
* ``imagenet100_train`` / ``imagenet100_val``: the same folders restricted to the 100 classes of
  ``imagenet100.txt`` (the CMC split the paper uses for IN-100);
* ``resim_demo_images`` / ``resim_demo_images_val``: natural photographs that scikit-image ships in
  its wheel (no download), read in place; the validation split is three other images;
* any folder of images, searched recursively: :func:`register_image_folder`.
"""

import importlib.util
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .image_io import is_image_file

__all__ = [
    "DATASETS_ENV",
    "datasets_root",
    "imagenet100_wnids",
    "list_image_files",
    "load_image_folder",
    "load_imagenet",
    "demo_images_dir",
    "load_demo_images",
    "register_image_folder",
    "register_imagenet",
    "DEMO_TRAIN_IMAGES",
    "DEMO_VAL_IMAGES",
]

DATASETS_ENV = "DETECTRON2_DATASETS"

# scikit-image's bundled photographs (skimage/data/), split into disjoint train and val sets.
DEMO_TRAIN_IMAGES = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "moon.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
)
# motorcycle_right.png is left out: it is the other half of a stereo pair with motorcycle_left.png,
# so its windows would be near-copies of the other's, competing as distractors.
DEMO_VAL_IMAGES = ("cell.png", "ihc.png", "motorcycle_left.png")


def datasets_root() -> str:
    """The datasets root: ``$DETECTRON2_DATASETS``, or ``datasets`` (relative to the cwd)."""
    return os.path.expanduser(os.environ.get(DATASETS_ENV, "datasets"))


def _missing(path: str, what: str) -> FileNotFoundError:
    env = os.environ.get(DATASETS_ENV)
    where = f"${DATASETS_ENV}={env}" if env is not None else f"${DATASETS_ENV} is unset: ./datasets"
    return FileNotFoundError(
        f"{what}: directory not found: {os.path.abspath(path)} ({where}). Put the data there or "
        f"point ${DATASETS_ENV} at the folder that holds it."
    )


def imagenet100_wnids() -> list[str]:
    """The 100 WordNet ids of IN-100 (CMC split), from the packaged ``imagenet100.txt``."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet100.txt")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def list_image_files(root: str) -> list[str]:
    """Image files under ``root``, recursively (symlinks followed), in a stable sorted order."""
    if not os.path.isdir(root):
        raise _missing(root, "image folder")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
    return files


def _records(files: list[str], root: str, what: str) -> list[dict]:
    if not files:
        raise FileNotFoundError(f"{what}: no image files under {os.path.abspath(root)}")
    return [{"file_name": f, "image_id": i} for i, f in enumerate(files)]


def load_image_folder(root: str) -> list[dict]:
    """Dataset dicts for every image under ``root`` (recursive)."""
    return _records(list_image_files(root), root, "image folder")


def load_imagenet(split_dir: str, wnids: list[str] | None = None) -> list[dict]:
    """Dataset dicts of an ImageNet split folder (``<split_dir>/<wnid>/*.JPEG``).

    Args:
        split_dir: e.g. ``$DETECTRON2_DATASETS/imagenet/train``.
        wnids: keep only these classes (all must exist); None keeps every class folder. A split
            folder without class sub-folders (flat ``val/``) is listed as a plain image folder.
    """
    if not os.path.isdir(split_dir):
        raise _missing(split_dir, "ImageNet split")
    with os.scandir(split_dir) as it:
        class_dirs = sorted(e.name for e in it if e.is_dir())
    if not class_dirs:
        if wnids is not None:
            raise FileNotFoundError(f"ImageNet split {split_dir} has no class folders")
        return load_image_folder(split_dir)
    if wnids is not None:
        missing = sorted(set(wnids) - set(class_dirs))
        if missing:
            raise FileNotFoundError(
                f"ImageNet split {os.path.abspath(split_dir)} lacks {len(missing)} of the "
                f"requested classes, e.g. {missing[:5]}"
            )
        class_dirs = sorted(wnids)
    records = []
    for wnid in class_dirs:
        folder = os.path.join(split_dir, wnid)
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it if is_image_file(e.name))
        base = len(records)
        records.extend(
            {"file_name": os.path.join(folder, n), "image_id": base + i, "class_id": wnid}
            for i, n in enumerate(names)
        )
    if not records:
        raise FileNotFoundError(f"ImageNet split {os.path.abspath(split_dir)}: no image files")
    return records


def demo_images_dir() -> str:
    """scikit-image's bundled data folder (found without importing scikit-image)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the resim_demo_images datasets read the photographs bundled with scikit-image; "
            "install it (pip install scikit-image)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def load_demo_images(names: tuple[str, ...] = DEMO_TRAIN_IMAGES) -> list[dict]:
    """Dataset dicts of scikit-image's bundled photographs ``names`` (those present)."""
    root = demo_images_dir()
    files = [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n))]
    return _records(files, root, "resim demo images")


def register_image_folder(name: str, root: str, **metadata) -> None:
    """Register every image under ``root`` (recursive) as the dataset ``name``."""
    DatasetCatalog.register(name, lambda: load_image_folder(root))
    MetadataCatalog.get(name).set(image_root=root, **metadata)


def register_imagenet(name: str, split: str, wnids: list[str] | None = None) -> None:
    """Register ``$DETECTRON2_DATASETS/imagenet/<split>`` (restricted to ``wnids``) as ``name``."""
    DatasetCatalog.register(
        name, lambda: load_imagenet(os.path.join(datasets_root(), "imagenet", split), wnids)
    )


def _register_builtins() -> None:
    existing = set(DatasetCatalog.list())
    if "imagenet_train" not in existing:
        register_imagenet("imagenet_train", "train")
        register_imagenet("imagenet_val", "val")
        wnids = imagenet100_wnids()
        register_imagenet("imagenet100_train", "train", wnids)
        register_imagenet("imagenet100_val", "val", wnids)
    if "resim_demo_images" not in existing:
        DatasetCatalog.register("resim_demo_images", lambda: load_demo_images(DEMO_TRAIN_IMAGES))
        DatasetCatalog.register("resim_demo_images_val", lambda: load_demo_images(DEMO_VAL_IMAGES))


_register_builtins()
