"""detectron2's DensePose project (v0.6) set up the way resim_d2 runs it: data from
``$DETECTRON2_DATASETS``, its data files from local copies, never a download.

:func:`ensure_densepose` imports the ``densepose`` package (its config keys, ROI heads, datasets,
evaluators) and, once per process:

* re-registers the project's datasets under ``$DETECTRON2_DATASETS`` (the project registers them
  under ``./datasets``, relative to the working directory, whatever the variable says);
* routes the project's data files, which it reads from its public download host
  (:data:`DENSEPOSE_URL`), to local copies (:class:`DensePoseDataFiles`): a missing file is a
  :class:`MissingDensePoseDataError` naming the file, where it comes from and where to put it.

The four data files the chart-based (IUV) DensePose R-CNN needs, looked up as
``densepose/data/<file>`` under ``$DETECTRON2_DATASETS`` (default ``./datasets``), then under
iopath's download cache (``$FVCORE_CACHE``, default ``~/.torch/iopath_cache``), the layout a
connected machine leaves behind.
"""

from __future__ import annotations

import functools
import importlib
import os

from iopath.common.file_io import PathHandler, get_cache_dir

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

__all__ = [
    "DATA_FILES",
    "DENSEPOSE_URL",
    "DensePoseDataFiles",
    "MissingDensePoseDataError",
    "data_file_locations",
    "densepose_checkpointer_class",
    "ensure_densepose",
    "register_datasets_under",
]

# the download host of the project's data; paths below it mirror the URL: densepose/data/<file>
DENSEPOSE_URL = "https://dl.fbaipublicfiles.com/densepose/"
_HOST = "https://dl.fbaipublicfiles.com/"

# file -> what reads it
DATA_FILES = {
    "UV_symmetry_transforms.mat": "the DensePose data mapper and horizontal flip (U/V of each "
    "part mirrored)",
    "SMPL_subdiv.mat": "DensePoseCOCOEvaluator (U/V and part of each SMPL mesh vertex, for GPS)",
    "SMPL_SUBDIV_TRANSFORM.mat": "DensePoseCOCOEvaluator (vertex index map, for GPS)",
    "Pdist_matrix.pkl": "DensePoseCOCOEvaluator (geodesic distances between vertices, for GPS)",
}


class MissingDensePoseDataError(FileNotFoundError):
    """A data file of the DensePose project is not available locally."""


def data_file_locations(relpath: str, cache_dir: str | None = None) -> list[str]:
    """Where a file ``<host>/<relpath>`` is looked for, in order."""
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    return [os.path.join(root, relpath), os.path.join(get_cache_dir(cache_dir), relpath)]


class DensePoseDataFiles(PathHandler):
    """iopath handler for ``https://dl.fbaipublicfiles.com/densepose/...``: local copies only.

    Registered on detectron2's ``PathManager``, it answers the project's
    ``PathManager.get_local_path(URL)`` calls with the first of :func:`data_file_locations` that
    exists. It downloads nothing: offline machines, CI and a user who wants to know what is read
    get the same behaviour. ``timeout_sec`` (a hint the project passes for the 1.5 GB
    ``Pdist_matrix.pkl``) is accepted and has nothing to time out.
    """

    def _get_supported_prefixes(self):
        return [DENSEPOSE_URL]

    def _get_local_path(self, path, force=False, cache_dir=None, timeout_sec=None, **kwargs):
        self._check_kwargs(kwargs)
        relpath = path[len(_HOST) :]
        places = data_file_locations(relpath, cache_dir)
        for place in places:
            if os.path.isfile(place):
                return place
        name = os.path.basename(relpath)
        use = DATA_FILES.get(name, "detectron2's DensePose project")
        raise MissingDensePoseDataError(
            f"DensePose data file '{name}' (read by {use}) was not found. resim_d2 downloads "
            f"nothing: fetch {path} on a connected machine and put it at\n  {places[0]}\n"
            f"(that is $DETECTRON2_DATASETS/{relpath}) or at\n  {places[1]}\n(iopath's cache, "
            "$FVCORE_CACHE). See docs/transfer.md, 'DensePose data files'."
        )

    def _open(self, path, mode="r", buffering=-1, **kwargs):
        return open(self._get_local_path(path, **kwargs), mode, buffering=buffering)

    def _exists(self, path, **kwargs):
        self._check_kwargs(kwargs)
        return any(os.path.isfile(p) for p in data_file_locations(path[len(_HOST) :]))

    _isfile = _exists


def register_datasets_under(root: str) -> list[str]:
    """(Re-)register the DensePose project's builtin datasets with paths under ``root``.

    The same names, files and metadata as the project's own ``builtin.py`` registration, which
    uses ``./datasets``. Returns the names registered.
    """
    from densepose.data.datasets import chimpnsee, coco, lvis

    names = []

    def again(name, register):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        register()
        names.append(name)

    for info in coco.DATASETS + coco.BASE_DATASETS:
        again(info.name, functools.partial(coco.register_dataset, info, root))
    for info in lvis.DATASETS:
        again(info.name, functools.partial(lvis.register_dataset, info, root))
    again(chimpnsee.CHIMPNSEE_DATASET_NAME, functools.partial(chimpnsee.register_dataset, root))
    return names


_registered_root = None  # where the project's datasets point now (None: its own ./datasets)


@functools.cache
def _register_handler() -> None:
    PathManager.register_handler(DensePoseDataFiles())


def ensure_densepose():
    """Import the ``densepose`` package and set it up as this module describes; returns it.

    Idempotent; a changed ``$DETECTRON2_DATASETS`` re-registers the datasets. Raises ImportError
    when the project is not installed (:func:`resim_d2.utils.projects.add_project_configs` turns
    it into the message users see).
    """
    global _registered_root
    module = importlib.import_module("densepose")
    _register_handler()
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    if root != _registered_root:
        register_datasets_under(root)
        _registered_root = root
    return module


@functools.cache
def densepose_checkpointer_class():
    """:class:`~resim_d2.checkpoint.TransferCheckpointer` that also does what the project's
    ``DensePoseCheckpointer`` does (rename HRNet ImageNet weights into the backbone)."""
    from densepose.modeling.densepose_checkpoint import DensePoseCheckpointer

    from ..checkpoint import TransferCheckpointer

    class DensePoseTransferCheckpointer(TransferCheckpointer, DensePoseCheckpointer):
        """Converted ReSim weights (RESIM.FINETUNE.TRANSFER_FPN applied) and the project's HRNet
        renaming, on the file detectron2 read."""

    return DensePoseTransferCheckpointer
