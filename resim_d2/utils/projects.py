"""detectron2 projects (outside detectron2's core package) that some fine-tuning configs need.

DensePose R-CNN (``configs/finetune/densepose_*.yaml``) needs detectron2's DensePose project, the
``densepose`` package: its config keys (``MODEL.DENSEPOSE_ON``, ``MODEL.ROI_DENSEPOSE_HEAD.*``),
its ROI heads (``DensePoseROIHeads``), datasets and evaluator. It is not a dependency of resim_d2
(``bash run.sh setup --densepose`` adds it; :mod:`resim_d2.utils.densepose_project` sets it up).
Call :func:`add_project_configs` between ``add_resim_config(cfg)`` and ``cfg.merge_from_file``: it
adds the project's keys when the file needs them, and without the project it raises
:class:`MissingProjectError` saying how to install it (instead of detectron2's "Non-existent config
key" or "No object named 'DensePoseROIHeads'").
"""

from __future__ import annotations

import importlib

from detectron2.config import CfgNode

__all__ = ["MissingProjectError", "PROJECTS", "add_project_configs", "required_projects"]

# name -> (function importing and setting up the project, function adding its config keys,
# how to install it)
PROJECTS = {
    "DensePose": (
        "resim_d2.utils.densepose_project:ensure_densepose",
        "add_densepose_config",
        "bash run.sh setup --densepose [PATH]\n"
        "  PATH: the projects/DensePose folder of a detectron2 v0.6 checkout (offline: a copy on "
        "disk, e.g. ../shared/third_party/detectron2-v0.6/projects/DensePose); without PATH run.sh "
        "clones detectron2 v0.6. It writes a .pth file naming that folder into the venv and "
        "pip installs av and scipy. By hand:\n"
        "  echo /path/to/detectron2/projects/DensePose > \"$(python -c 'import sysconfig; "
        'print(sysconfig.get_paths()["purelib"])\')/densepose_project.pth" && '
        "pip install av scipy\n"
        "  or: pip install --no-deps 'git+https://github.com/facebookresearch/detectron2@v0.6"
        "#subdirectory=projects/DensePose' && pip install av scipy\n"
        "  (--no-deps keeps the installed detectron2: the project's own requirement would build "
        "detectron2 from source; its setup.py cannot install from a standalone copy of the folder)",
    ),
}


class MissingProjectError(ImportError):
    """A config needs a detectron2 project that is not installed."""


def _needs_densepose(d: dict) -> bool:
    model = d.get("MODEL", {}) or {}
    roi_heads = (model.get("ROI_HEADS", {}) or {}).get("NAME", "")
    return (
        "DENSEPOSE_ON" in model
        or "ROI_DENSEPOSE_HEAD" in model
        or "DensePose" in str(roi_heads)
        or "DensePose" in str(model.get("META_ARCHITECTURE", ""))
    )


def required_projects(config_file: str) -> list[str]:
    """Names (keys of :data:`PROJECTS`) of the projects ``config_file`` (and its bases) needs."""
    d = CfgNode.load_yaml_with_base(config_file, allow_unsafe=True)
    return ["DensePose"] if _needs_densepose(d) else []


def add_project_configs(cfg: CfgNode, config_file: str) -> list[str]:
    """Add to ``cfg`` the config keys of every project ``config_file`` needs; returns their names.

    Raises MissingProjectError (naming the config, the project and how to install it) when one is
    not importable. Importing the project also registers its models and datasets.
    """
    needed = required_projects(config_file)
    for name in needed:
        set_up, add_fn, install = PROJECTS[name]
        module_name, fn = set_up.split(":")
        try:
            module = getattr(importlib.import_module(module_name), fn)()
        except ImportError as e:
            raise MissingProjectError(
                f"{config_file} needs detectron2's {name} project (Python package "
                f"'{name.lower()}'), which is not installed ({e}). Install it for detectron2 "
                f"v0.6:\n  {install}"
            ) from e
        getattr(module, add_fn)(cfg)
    return needed
