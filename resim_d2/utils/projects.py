"""detectron2 projects (outside detectron2's core package) that some fine-tuning configs need.

DensePose R-CNN (``configs/finetune/densepose_*.yaml``) needs detectron2's DensePose project, the
``densepose`` package: its config keys (``MODEL.DENSEPOSE_ON``, ``MODEL.ROI_DENSEPOSE_HEAD.*``),
its ROI heads (``DensePoseROIHeads``), datasets and evaluator. It is not a dependency of resim_d2.
Call :func:`add_project_configs` between ``add_resim_config(cfg)`` and ``cfg.merge_from_file``: it
adds the project's keys when the file needs them, and without the project it raises
:class:`MissingProjectError` saying how to install it (instead of detectron2's "Non-existent config
key" or "No object named 'DensePoseROIHeads'").
"""

from __future__ import annotations

import importlib

from detectron2.config import CfgNode

__all__ = ["MissingProjectError", "PROJECTS", "add_project_configs", "required_projects"]

# name -> (module, function that adds its config keys, how to install it)
PROJECTS = {
    "DensePose": (
        "densepose",
        "add_densepose_config",
        "pip install --no-deps 'git+https://github.com/facebookresearch/detectron2@v0.6"
        "#subdirectory=projects/DensePose' && pip install av scipy\n"
        "  (or: git clone -b v0.6 https://github.com/facebookresearch/detectron2 && "
        "export PYTHONPATH=$PWD/detectron2/projects/DensePose:$PYTHONPATH)\n"
        "  --no-deps keeps the installed detectron2: the project's own requirement would build "
        "detectron2 from source.",
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
        module_name, add_fn, install = PROJECTS[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise MissingProjectError(
                f"{config_file} needs detectron2's {name} project (Python package "
                f"'{module_name}'), which is not installed ({e}). Install it for detectron2 "
                f"v0.6:\n  {install}"
            ) from e
        getattr(module, add_fn)(cfg)
    return needed
