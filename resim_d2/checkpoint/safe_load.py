"""Reading weight files without running code from them.

A ``.pth`` file is a pickle inside a zip archive, and a ``.pkl`` file (detectron2's model-zoo
format, also written by ``tools/convert.py``) is a bare pickle. Unpickling calls whatever functions
the file names, so a plain ``pickle.load`` / ``torch.load(weights_only=False)`` of a downloaded file
runs the downloader's code. Here:

* ``.pkl``: :class:`WeightsUnpickler` resolves only the globals detectron2 weight files hold
  (NumPy arrays, scalars and dtypes; ``OrderedDict``; the ``_codecs.encode`` that protocol-2
  pickles use for bytes); dicts, lists, tuples, strings and numbers need no global at all.
* everything else: ``torch.load(weights_only=True)`` with the NumPy globals above allowed.

Anything else is refused with :class:`UnsafeCheckpointError`, naming the file and what it holds;
a file that is no checkpoint at all (text, truncated, empty) raises :class:`CheckpointReadError`
naming the file. Neither suggests loading the file unsafely.

``resim_d2.compat`` routes detectron2's ``DetectionCheckpointer`` (every ``MODEL.WEIGHTS``,
``--resume`` and evaluation load) through these two readers; ``tools/convert.py`` uses
:func:`load_weights_file` directly. This module imports no detectron2.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import io
import os
import pickle
import re
import warnings
import zipfile

import numpy as np
import torch

__all__ = [
    "CheckpointReadError",
    "UnsafeCheckpointError",
    "WeightsUnpickler",
    "load_pickle_weights",
    "load_torch_weights",
    "load_weights_file",
    "numpy_weight_globals",
]


class CheckpointReadError(ValueError):
    """A file that cannot be read as weights (missing, empty, truncated, not a checkpoint)."""


class UnsafeCheckpointError(CheckpointReadError, pickle.UnpicklingError):
    """A weight file that names something other than plain data (a function, a class instance):
    loading it would run code, so it is refused."""


# (module, name) of every global a detectron2 / NumPy weight pickle may name. NumPy 1.x wrote
# "numpy.core.*", NumPy 2.x writes "numpy._core.*"; both resolve to the installed NumPy's objects.
_NUMPY_GLOBALS = (
    ("numpy.core.multiarray", "_reconstruct"),  # ndarray.__reduce__ (protocols 0-4)
    ("numpy.core.multiarray", "scalar"),  # NumPy scalars (np.float32(1.0))
    ("numpy.core.numeric", "_frombuffer"),  # ndarray.__reduce_ex__ (protocol 5)
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
)
_OTHER_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1")
    ("_codecs", "encode"): __import__("codecs").encode,
}


def _numpy_object(module: str, name: str):
    core = "numpy._core" if hasattr(np, "_core") else "numpy.core"
    if module.startswith("numpy.core."):
        module = core + module[len("numpy.core") :]
    return getattr(importlib.import_module(module), name)


class _Forbidden(pickle.UnpicklingError):
    """Raised inside the unpickler for a global (or dtype) that weight files never hold."""


def _safe_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise _Forbidden(f"a NumPy array of Python objects (dtype {dtype})")
    return dtype


def _allowed_globals() -> dict:
    allowed = dict(_OTHER_GLOBALS)
    for module, name in _NUMPY_GLOBALS:
        obj = _safe_dtype if name == "dtype" else _numpy_object(module, name)
        allowed[(module, name)] = obj
        allowed[(module.replace("numpy.core", "numpy._core"), name)] = obj
    for name in dir(getattr(np, "dtypes", ())):  # NumPy >= 1.25: dtype classes
        if name.endswith("DType") and name != "ObjectDType":
            allowed[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    return allowed


def numpy_weight_globals() -> list:
    """The NumPy objects a weight file may name, for ``torch.serialization.safe_globals``."""
    objs = [_numpy_object(m, n) for m, n in _NUMPY_GLOBALS]
    objs += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", ())) if n.endswith("DType")]
    return [o for o in objs if not isinstance(o, type) or o.__name__ != "ObjectDType"]


class WeightsUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only the globals of :data:`_NUMPY_GLOBALS` and
    ``OrderedDict``; any other global (``os.system``, ``builtins.eval``, a class) raises
    ``pickle.UnpicklingError`` before anything is called."""

    _allowed: dict | None = None

    def find_class(self, module, name):
        if WeightsUnpickler._allowed is None:
            WeightsUnpickler._allowed = _allowed_globals()
        try:
            return WeightsUnpickler._allowed[(module, name)]
        except KeyError:
            raise _Forbidden(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise _Forbidden(f"a persistent reference ({pid!r})")


def _name_of(f) -> str:
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    return str(getattr(f, "name", "<file object>"))


def _refused(name: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{name}: refused to load: the file holds {what}, which is not plain weights, and "
        "unpickling it could run code. Weight files are read with only tensors, NumPy arrays, "
        "dicts, lists, tuples, strings and numbers allowed."
    )


def load_pickle_weights(f, encoding: str = "latin1"):
    """Unpickle a ``.pkl`` weight file (path or binary file object) with :class:`WeightsUnpickler`.

    ``encoding="latin1"`` reads Python 2 pickles (Detectron/Caffe2 model-zoo files) as detectron2
    does. Raises :class:`UnsafeCheckpointError` or :class:`CheckpointReadError`, naming the file.
    """
    name = _name_of(f)
    with contextlib.ExitStack() as stack:
        if isinstance(f, (str, os.PathLike)):
            f = stack.enter_context(_open(name))
        head = f.read(4)
        f.seek(-len(head), io.SEEK_CUR)
        if head.startswith(b"PK\x03\x04"):
            raise CheckpointReadError(
                f"{name}: this is a torch.save (zip) file, not a pickle; name it .pth to load it"
            )
        try:
            return WeightsUnpickler(f, encoding=encoding).load()
        except _Forbidden as e:
            raise _refused(name, str(e)) from None
        except pickle.UnpicklingError as e:
            raise CheckpointReadError(f"{name}: not a readable pickle ({e})") from None
        except Exception as e:  # noqa: BLE001  arbitrary bytes fail in arbitrary ways
            raise CheckpointReadError(
                f"{name}: not a readable weight file ({type(e).__name__}: {e})"
            ) from None


def _open(name):
    try:
        return open(name, "rb")
    except FileNotFoundError:
        raise CheckpointReadError(f"{name}: no such file") from None
    except OSError as e:
        raise CheckpointReadError(f"{name}: cannot open ({e})") from None


# how torch's weights-only unpickler names a refused global ("Unsupported global: GLOBAL x.y",
# "Trying to load unsupported GLOBAL x.y whose module x is blocked")
_TORCH_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_torch_weights(f, map_location="cpu"):
    """``torch.load(f, weights_only=True)`` with NumPy arrays allowed, and nothing else.

    Raises :class:`UnsafeCheckpointError` naming the file and the object it refers to, or
    :class:`CheckpointReadError` for anything that is no torch checkpoint; torch's advice to
    retry with ``weights_only=False`` is not passed on.
    """
    name = _name_of(f)
    if isinstance(f, (str, os.PathLike)) and not os.path.isfile(name):
        raise CheckpointReadError(f"{name}: no such file")
    try:
        with torch.serialization.safe_globals(numpy_weight_globals()), warnings.catch_warnings():
            # torch warns about the pickle protocol of files that are no torch checkpoint
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = _TORCH_GLOBAL.search(text)
        detail = text.partition("WeightsUnpickler error:")[2].strip()
        detail = detail.splitlines()[0] if detail else ""
        if m or (detail and not detail.startswith("Unsupported operand")):
            raise _refused(name, m.group(1) if m else f"something else ({detail})") from None
        raise CheckpointReadError(
            f"{name}: not a torch checkpoint (torch.load found no weights in it)"
        ) from None
    except Exception as e:  # noqa: BLE001  arbitrary bytes fail in arbitrary ways
        if isinstance(e, FileNotFoundError):
            raise CheckpointReadError(f"{name}: no such file") from None
        raise CheckpointReadError(
            f"{name}: not a readable torch checkpoint ({_describe(f)}; {type(e).__name__}: "
            f"{_first_line(str(e))})"
        ) from None


def _describe(f) -> str:
    """What a file that torch.load could not read looks like, for the error message."""
    if not isinstance(f, (str, os.PathLike)):
        return "empty, truncated or another kind of file"
    if os.path.getsize(f) == 0:
        return "an empty file"
    if zipfile.is_zipfile(f):
        return "a zip archive without a readable torch checkpoint in it"
    with open(f, "rb") as fh:
        if fh.read(4).startswith(b"PK\x03\x04"):
            return "a truncated or damaged zip archive (torch.save writes zip archives)"
    return "not a zip archive as torch.save writes, nor a legacy torch file"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no details"


def load_weights_file(path: str):
    """Load any weight file safely: ``.pkl`` with :func:`load_pickle_weights`, else
    :func:`load_torch_weights`."""
    if os.fspath(path).endswith(".pkl"):
        return load_pickle_weights(path)
    return load_torch_weights(path)
