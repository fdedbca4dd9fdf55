"""The single place that adapts detectron2 v0.6 to today's torch, NumPy, Pillow and setuptools.

detectron2 v0.6 (2021) predates Pillow 10, NumPy 1.24/2.x, setuptools without ``pkg_resources``,
torch 2.6's ``weights_only`` loading and Python 3.11, and installs here without its compiled ops
(``detectron2._C``). Each adaptation below is applied only when the
installed library needs it, touches as little as it can (the NumPy and ``pkg_resources`` fixes are
scoped to the detectron2 modules that need them, through an import hook), and is recorded in
:data:`APPLIED` so tests and logs can say what was done. A detectron2 built from source with its
compiled ops on a library stack it supports gets none of them.

Call :func:`apply` before importing detectron2 submodules; ``import resim_d2`` does it.
"""

import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.resources
import importlib.util
import os
import random
import sys
import types
import warnings

import numpy as np

__all__ = ["apply", "APPLIED", "MissingCompiledOpError", "has_compiled_ops", "numpy_pickle_globals"]

# name -> one line saying why; filled by apply()
APPLIED: dict[str, str] = {}

# detectron2 modules that use NumPy aliases removed in NumPy 1.24 (np.int, np.float, np.str, and
# np.bool
# until NumPy 2.0 brought it back as the bool dtype).
_NUMPY_ALIAS_USERS = (
    "detectron2.data.build",
    "detectron2.data.datasets.pascal_voc",
    "detectron2.evaluation.pascal_voc_evaluation",
    "detectron2.evaluation.sem_seg_evaluation",
    "detectron2.structures.masks",
    "detectron2.utils.visualizer",
    "detectron2.utils.video_visualizer",
)
_REMOVED_NUMPY_ALIASES = {"int": int, "float": float, "bool": bool, "str": str, "object": object}

# detectron2 modules that run `from detectron2 import _C` at import time.
_COMPILED_OP_USERS = (
    "detectron2.layers.deform_conv",
    "detectron2.layers.rotated_boxes",
    "detectron2.layers.roi_align_rotated",
    "detectron2.evaluation.fast_eval_api",
)

_BUILD_HINT = (
    "This detectron2 has no compiled ops (detectron2._C); build detectron2 v0.6 from source to get "
    "them: see https://detectron2.readthedocs.io/en/latest/tutorials/install.html"
)


class MissingCompiledOpError(NotImplementedError):
    """Raised when a model asks for an op that lives only in detectron2's compiled extension."""


def has_compiled_ops() -> bool:
    """True if ``detectron2._C`` (the compiled extension) can be imported."""
    try:
        return importlib.util.find_spec("detectron2._C") is not None
    except (ImportError, ValueError):
        return False


class _MissingOps(types.ModuleType):
    """Stands in for ``detectron2._C`` inside the modules that import it; every op raises."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingCompiledOpError(f"detectron2 op '{name}' is not available. {_BUILD_HINT}")


def _numpy_view(name_to_value: dict) -> types.ModuleType:
    """A view of numpy in which ``name_to_value`` replaces or adds attributes."""
    view = types.ModuleType("numpy")

    def __getattr__(name):
        if name in name_to_value:
            return name_to_value[name]
        return getattr(np, name)

    view.__getattr__ = __getattr__
    view.__dict__.update({"__name__": "numpy", "__file__": np.__file__})
    return view


def _numpy_with_removed_aliases() -> types.ModuleType:
    """A view of numpy that also answers the aliases the installed NumPy removed."""
    return _numpy_view({k: v for k, v in _REMOVED_NUMPY_ALIASES.items() if k not in np.__dict__})


class _PkgResourcesShim(types.ModuleType):
    """The one ``pkg_resources`` call detectron2.model_zoo makes, on importlib.resources."""

    @staticmethod
    def resource_filename(package, resource):
        return str(importlib.resources.files(package).joinpath(resource))


# -------------------------------------------------------------------------------------------------
# import hook: run a context manager around, and a fix-up after, executing selected modules
# -------------------------------------------------------------------------------------------------
class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, around, after):
        self._loader, self._around, self._after = loader, around, after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with self._around(module):
            self._loader.exec_module(module)
        self._after(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.patches = {}  # module name -> (around, after)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.patches:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            around, after = self.patches[fullname]
            spec.loader = _PatchingLoader(spec.loader, around, after)
        return spec


_finder = _PatchingFinder()


def _patch_module(name, around=None, after=None):
    """Apply (around, after) to ``name`` when it is imported, or now if it already was."""
    around = around or (lambda m: contextlib.nullcontext())
    after = after or (lambda m: None)
    if name in sys.modules:
        mod = sys.modules[name]
        with around(mod):
            pass
        after(mod)
        # a module already imported has executed; 'around' fixes cannot reach it
        return
    if name in _finder.patches:  # a second adaptation of the same module: apply both, in order
        around, after = _chained(_finder.patches[name], (around, after))
    _finder.patches[name] = (around, after)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def _chained(first, second):
    """One (around, after) pair that applies ``first`` and then ``second``."""

    @contextlib.contextmanager
    def around(module):
        with first[0](module), second[0](module):
            yield

    def after(module):
        first[1](module)
        second[1](module)

    return around, after


@contextlib.contextmanager
def _temporary_module(name, module):
    """Make ``import name`` return ``module`` while the block runs, then forget it."""
    saved = sys.modules.get(name)
    sys.modules[name] = module
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved


@contextlib.contextmanager
def _missing_ops_during_import(module):
    import detectron2

    had_attr = hasattr(detectron2, "_C")
    stub = _MissingOps("detectron2._C")
    detectron2._C = stub
    try:
        with _temporary_module("detectron2._C", stub):
            yield
    finally:
        if not had_attr:
            del detectron2._C


def _use_pycocotools_coco_eval(module):
    # COCOEvaluator's default fast path (COCOeval_opt) runs on the compiled op; pycocotools'
    # COCOeval computes the same numbers in Python.
    from pycocotools.cocoeval import COCOeval

    module.COCOeval_opt = COCOeval


def numpy_pickle_globals():
    """What a pickled NumPy array or scalar references: reconstructors, ndarray, dtypes."""
    core = getattr(np, "_core", None) or np.core
    names = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    names += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return names


def _checkpoints_with_numpy(module):
    # detectron2/fvcore checkpoints often hold NumPy arrays (Caffe2 conversions, MoCo-style
    # converters); torch>=2.6's weights_only loading rejects them. Allow NumPy data, and only
    # NumPy data, while DetectionCheckpointer reads a file.
    import torch

    cls = module.DetectionCheckpointer
    original = cls._load_file
    allowed = numpy_pickle_globals()

    def _load_file(self, filename):
        with torch.serialization.safe_globals(allowed):
            return original(self, filename)

    cls._load_file = _load_file


class _SetSamplingRandom(random.Random):
    """random.Random whose sample() still accepts a set, as before Python 3.11 (in sorted order,
    so the draw is reproducible)."""

    def sample(self, population, k, **kwargs):
        if isinstance(population, (set, frozenset)):
            population = sorted(population)
        return super().sample(population, k, **kwargs)


def _map_dataset_retry(module):
    # MapDataset retries a failed record with self._rng.sample(set_of_indices, k=1); Python 3.11
    # removed sampling from sets, so the first mapper returning None raised TypeError.
    cls = module.MapDataset
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._rng = _SetSamplingRandom(42)

    cls.__init__ = __init__


# -------------------------------------------------------------------------------------------------
def _pillow_linear():
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        # Pillow 10 removed Image.LINEAR; detectron2's ExtentTransform uses it as a default
        # argument.
        Image.LINEAR = Image.BILINEAR
        APPLIED["pillow_linear"] = "Pillow>=10 removed Image.LINEAR (alias of BILINEAR)"


def _give_numpy_aliases(modules) -> bool:
    """Let ``modules`` see NumPy with the aliases it removed; False where none is missing."""
    if all(k in np.__dict__ for k in _REMOVED_NUMPY_ALIASES):
        return False
    view = _numpy_with_removed_aliases()
    for name in modules:
        _patch_module(name, after=lambda m: setattr(m, "np", view))
    return True


def _numpy_aliases():
    if not _give_numpy_aliases(_NUMPY_ALIAS_USERS):
        return
    APPLIED["numpy_aliases"] = "NumPy>=1.24 removed np.int/np.float/np.str (and 1.24-1.26 np.bool)"


def _pkg_resources():
    if importlib.util.find_spec("pkg_resources") is None:  # (importing it only warns)
        shim = _PkgResourcesShim("pkg_resources")
        _patch_module(
            "detectron2.model_zoo.model_zoo",
            around=lambda m: _temporary_module("pkg_resources", shim),
        )
        APPLIED["pkg_resources"] = "setuptools>=81 dropped pkg_resources (model_zoo config lookup)"


def _compiled_ops():
    if has_compiled_ops():
        return
    for name in _COMPILED_OP_USERS:
        _patch_module(name, around=_missing_ops_during_import)
    _patch_module("detectron2.evaluation.coco_evaluation", after=_use_pycocotools_coco_eval)
    APPLIED["compiled_ops"] = "detectron2 installed without detectron2._C (Python-only tree)"


def _python_set_sampling():
    if sys.version_info < (3, 11):
        return
    _patch_module("detectron2.data.common", after=_map_dataset_retry)
    APPLIED["set_sampling"] = "Python>=3.11 random.sample() refuses sets (MapDataset retry)"


def _torch_version() -> tuple[int, int]:
    import torch

    return tuple(int(x) for x in torch.__version__.split(".")[:2])


def _torch_load_weights_only():
    if _torch_version() < (2, 6):
        return
    _patch_module("detectron2.checkpoint.detection_checkpoint", after=_checkpoints_with_numpy)
    APPLIED["torch_load_numpy"] = "torch>=2.6 loads weights_only; detectron2 checkpoints hold NumPy"


# modules that call torch.jit.script at import (deprecated in torch 2.11; torch warns per call)
_JIT_SCRIPT_USERS = ("fvcore.nn.focal_loss", "detectron2.modeling.box_regression")
_JIT_SCRIPT_WARNING = r"`torch\.jit\.script` is (deprecated|not supported)"


@contextlib.contextmanager
def _quiet_jit_script(module):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_SCRIPT_WARNING)
        yield


def _jit_script_warning():
    if _torch_version() < (2, 11):
        return
    for name in _JIT_SCRIPT_USERS:
        _patch_module(name, around=_quiet_jit_script)
    APPLIED["jit_script_warning"] = (
        "torch>=2.11 warns on every torch.jit.script; fvcore/detectron2 script helpers at import"
    )


def _module_view(real: types.ModuleType, **overrides) -> types.ModuleType:
    """A stand-in for ``real`` that answers ``overrides`` and forwards every other attribute."""
    view = types.ModuleType(real.__name__)

    def __getattr__(name):
        return getattr(real, name)

    view.__getattr__ = __getattr__
    view.__dict__.update({"__file__": getattr(real, "__file__", None), **overrides})
    return view


def _safe_pickle_load(f, *args, **kwargs):
    from resim_d2.checkpoint.safe_load import load_pickle_weights

    return load_pickle_weights(f, encoding=kwargs.get("encoding", "latin1"))


def _safe_torch_load(f, map_location=None, *args, **kwargs):
    from resim_d2.checkpoint.safe_load import load_torch_weights

    return load_torch_weights(f, map_location=map_location)


def _load_weights_safely(module):
    # the module's own `pickle.load` / `torch.load` become loaders that refuse anything but plain
    # weights (resim_d2/checkpoint/safe_load.py); pickle and torch themselves are untouched
    overrides = {}
    if hasattr(module, "pickle"):
        overrides["pickle"] = _module_view(module.pickle, load=_safe_pickle_load)
    if hasattr(module, "torch"):
        overrides["torch"] = _module_view(module.torch, load=_safe_torch_load)
    for name, view in overrides.items():
        setattr(module, name, view)


# modules that read weight files: DetectionCheckpointer's .pkl (pickle.load) and .pyth
# (torch.load) branches, and fvcore's Checkpointer, which reads every other file (torch.load)
_WEIGHT_READERS = ("detectron2.checkpoint.detection_checkpoint", "fvcore.common.checkpoint")


def _safe_weight_loading():
    # Not a version fix: detectron2 (every version) unpickles .pkl weights with plain pickle.load,
    # and torch.load's default depends on the torch version and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
    # Applied always, for a detectron2 built from source as well.
    for name in _WEIGHT_READERS:
        _patch_module(name, after=_load_weights_safely)
    APPLIED["safe_weight_loading"] = (
        "detectron2 unpickles .pkl weights with pickle.load (runs code); reads weights only"
    )


def _gloo_distributed_worker(
    local_rank, main_func, world_size, gpus_per_machine, machine_rank, dist_url, args, timeout=None
):
    """detectron2's per-process start-up for a machine without CUDA: a gloo process group instead
    of NCCL, no device to select; the same ranks and per-machine groups as detectron2's."""
    import datetime

    import torch.distributed as dist

    from detectron2.utils import comm

    rank = machine_rank * gpus_per_machine + local_rank
    dist.init_process_group(
        "gloo",
        init_method=dist_url,
        world_size=world_size,
        rank=rank,
        timeout=timeout or datetime.timedelta(minutes=30),
    )
    for machine in range(world_size // gpus_per_machine):
        ranks = list(range(machine * gpus_per_machine, (machine + 1) * gpus_per_machine))
        group = dist.new_group(ranks)  # every process creates every group, in the same order
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)


def _launch_with_gloo(module):
    # detectron2's launch spawns `_distributed_worker`, which asserts CUDA and picks NCCL
    module._distributed_worker = _gloo_distributed_worker


def _ddp_on_cpu(module):
    # create_ddp_model passes device_ids=[local rank], which DistributedDataParallel refuses for a
    # module on the CPU
    original = module.create_ddp_model

    @functools.wraps(original)
    def create_ddp_model(model, **kwargs):
        if all(p.device.type == "cpu" for p in model.parameters()):
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    module.create_ddp_model = create_ddp_model


def _cpu_launch():
    import torch

    if torch.cuda.is_available():  # detectron2's own NCCL launch applies
        return
    _patch_module("detectron2.engine.launch", after=_launch_with_gloo)
    _patch_module("detectron2.engine.defaults", after=_ddp_on_cpu)
    APPLIED["cpu_launch"] = "no CUDA: detectron2's launch asserts CUDA and uses NCCL; use gloo"


def _ddp_buffers_synced_at_init(module):
    # DefaultTrainer asks for broadcast_buffers=False (no buffer broadcast at every forward). In a
    # torch whose DDP has forward_sync_buffers, that also skips the broadcast at construction, so
    # buffers initialised at random (the MoCo queue) differ between processes;
    # forward_sync_buffers=False keeps the meaning detectron2 was written for.
    original = module.create_ddp_model

    @functools.wraps(original)
    def create_ddp_model(model, **kwargs):
        if kwargs.get("broadcast_buffers", True) is False and "forward_sync_buffers" not in kwargs:
            del kwargs["broadcast_buffers"]
            kwargs["forward_sync_buffers"] = False
        return original(model, **kwargs)

    module.create_ddp_model = create_ddp_model


def _ddp_init_buffers():
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" not in inspect.signature(DistributedDataParallel).parameters:
        return
    _patch_module("detectron2.engine.defaults", after=_ddp_buffers_synced_at_init)
    APPLIED["ddp_init_buffers"] = (
        "torch DDP: broadcast_buffers=False no longer syncs buffers at init (MoCo queue differs)"
    )


_ADAPTATIONS = {
    "pillow_linear": _pillow_linear,
    "numpy_aliases": _numpy_aliases,
    "pkg_resources": _pkg_resources,
    "compiled_ops": _compiled_ops,
    "torch_load_numpy": _torch_load_weights_only,
    "set_sampling": _python_set_sampling,
    "jit_script_warning": _jit_script_warning,
    "safe_weight_loading": _safe_weight_loading,
    "cpu_launch": _cpu_launch,
    "ddp_init_buffers": _ddp_init_buffers,
}
_done = False


def apply():
    """Apply every adaptation the installed libraries need. Idempotent.

    ``RESIM_D2_NO_COMPAT`` (comma-separated names from ``_ADAPTATIONS``, or ``all``) turns
    adaptations off, for debugging and for the tests that show what each one prevents.
    """
    global _done
    if _done:
        return
    off = {x.strip() for x in os.environ.get("RESIM_D2_NO_COMPAT", "").split(",") if x.strip()}
    for name, adapt in _ADAPTATIONS.items():
        if name not in off and "all" not in off:
            adapt()
    _done = True


# -------------------------------------------------------------------------------------------------
# Transfer targets: detectron2's DensePose project (v0.6) and the Cityscapes scripts that
# detectron2's Cityscapes evaluators call. Registered into _ADAPTATIONS at the end of this section.
# -------------------------------------------------------------------------------------------------
# DensePose modules that use NumPy aliases removed in NumPy 1.24 (np.int, np.float)
_DENSEPOSE_NUMPY_ALIAS_USERS = (
    "densepose.evaluation.densepose_coco_evaluation",
    "densepose.vis.base",
)
# Cityscapes evaluation scripts -> the NumPy functions NumPy 2 changed under them: np.in1d
# (removed in NumPy 2.4), np.count_nonzero (returns a NumPy integer since NumPy 2, which the
# instance evaluation then fails to write to JSON)
_CITYSCAPES_NUMPY2_USERS = {
    "cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling": ("in1d", "count_nonzero"),
    "cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling": ("in1d",),
}


def _in1d(ar1, ar2, assume_unique=False, invert=False, **kwargs):
    # NumPy's own definition of in1d: isin on the flattened first array
    return np.isin(np.ravel(ar1), ar2, assume_unique=assume_unique, invert=invert, **kwargs)


def _count_nonzero_as_int(a, axis=None, **kwargs):
    # NumPy < 2 returned a Python int when counting the whole array
    count = np.count_nonzero(a, axis=axis, **kwargs)
    return int(count) if axis is None else count


def _densepose_numpy_aliases():
    if not _give_numpy_aliases(_DENSEPOSE_NUMPY_ALIAS_USERS):
        return
    APPLIED["densepose_numpy_aliases"] = (
        "NumPy>=1.24 removed np.int/np.float (DensePose GPS evaluation, visualisation)"
    )


def _cityscapes_numpy2():
    replacements = {}
    if not hasattr(np, "in1d"):
        replacements["in1d"] = _in1d
    if not isinstance(np.count_nonzero(np.zeros(1)), int):
        replacements["count_nonzero"] = _count_nonzero_as_int
    if not replacements:
        return
    for name, uses in _CITYSCAPES_NUMPY2_USERS.items():
        needed = {k: v for k, v in replacements.items() if k in uses}
        if needed:
            view = _numpy_view(needed)
            _patch_module(name, after=lambda m, view=view: setattr(m, "np", view))
    changed = "/".join(f"np.{k}" for k in sorted(replacements))
    APPLIED["cityscapes_numpy2"] = (
        f"NumPy 2 changed {changed} under the Cityscapes evaluation scripts"
    )


_ADAPTATIONS.update(
    {
        "densepose_numpy_aliases": _densepose_numpy_aliases,
        "cityscapes_numpy2": _cityscapes_numpy2,
    }
)
