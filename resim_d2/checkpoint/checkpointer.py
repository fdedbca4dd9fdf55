"""The training checkpointer: atomic saves, and ``--resume`` that falls back past unreadable files.

detectron2's checkpointer writes ``model_0000999.pth`` in place under its final name, so a run
killed (or a disk filling up) during the write leaves a partial file where a checkpoint should be,
and ``--resume`` of a newest checkpoint that does not load stops with the loader's error.
:class:`ResumableCheckpointer`:

* writes every file (checkpoints and the ``last_checkpoint`` tag) to a temporary name in the same
  folder, flushes and fsyncs it, then renames it over the final name: a reader sees the old file or
  the complete new one, never a partial one;
* on ``--resume`` tries the tagged checkpoint, then the older ``model_*.pth`` files, newest first,
  and continues from the first that reads, logging each file it skipped and why. If none reads it
  stops with the list, rather than start over and overwrite them. Processes of a multi-process run
  must agree on the file, or it stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .safe_load import CheckpointReadError

__all__ = ["AtomicWriter", "ResumableCheckpointer", "checkpoint_iteration"]

logger = logging.getLogger(__name__)

_ITERATION = re.compile(r"_(\d+)\.pth$")
TMP_MARK = ".tmp-"


def checkpoint_iteration(path: str) -> int | None:
    """The iteration in a periodic checkpoint's name (``model_0000999.pth`` -> 999), else None."""
    m = _ITERATION.search(os.path.basename(path))
    return int(m.group(1)) if m else None


class _AtomicFile:
    """A binary or text file written under a temporary name and renamed over ``path`` on a clean
    close; on an exception the temporary file is removed and ``path`` is left as it was."""

    def __init__(self, path: str, mode: str):
        self.path = path
        folder, base = os.path.split(os.path.abspath(path))
        self.folder = folder
        self.tmp = os.path.join(folder, f".{base}{TMP_MARK}{os.getpid()}")
        self.file = open(self.tmp, mode)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.file.close()
            with contextlib.suppress(OSError):
                os.remove(self.tmp)
            return False
        self.close()
        return False

    def close(self):
        if self.file.closed:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        # the rename itself must reach the disk, or a crash could bring the old name back
        with contextlib.suppress(OSError):
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class AtomicWriter:
    """A detectron2 ``PathManager`` whose ``open(path, "w"/"wb")`` of a local file is atomic
    (:class:`_AtomicFile`); every other call goes to the wrapped path manager."""

    def __init__(self, path_manager=PathManager):
        self._pm = path_manager

    def __getattr__(self, name):
        return getattr(self._pm, name)

    def open(self, path, mode="r", **kwargs):
        if mode in ("w", "wb") and not kwargs and "://" not in str(path):
            return _AtomicFile(str(path), mode)
        return self._pm.open(path, mode, **kwargs)


class ResumableCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic writes and a ``--resume`` that skips unreadable
    checkpoints (see the module docstring). Reading is detectron2's, made safe by
    ``resim_d2.compat`` (only weights are loaded)."""

    def __init__(self, model, save_dir="", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.path_manager = AtomicWriter(self.path_manager)

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except CheckpointReadError:
            raise
        except (OSError, EOFError, RuntimeError) as e:  # truncated zip, I/O error
            raise CheckpointReadError(f"{filename}: {type(e).__name__}: {e}") from None

    def resume_candidates(self) -> list[str]:
        """The tagged checkpoint, then older periodic checkpoints, newest first."""
        tagged = self.get_checkpoint_file()
        files = [f for f in self.get_all_checkpoint_files() if checkpoint_iteration(f) is not None]
        limit = checkpoint_iteration(tagged) if tagged else None
        older = [
            f
            for f in files
            if os.path.abspath(f) != os.path.abspath(tagged or "")
            and (limit is None or checkpoint_iteration(f) < limit)
        ]
        older.sort(key=checkpoint_iteration, reverse=True)
        return ([tagged] if tagged else []) + older

    def resume_or_load(self, path, *, resume=True):
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        self._warn_interrupted_writes()
        skipped, loaded, result = [], None, None
        for candidate in self.resume_candidates():
            try:
                if not self.path_manager.isfile(candidate):
                    raise CheckpointReadError(f"{candidate}: no such file")
                result = self.load(candidate)
            except CheckpointReadError as e:
                logger.warning(f"--resume: skipping {candidate}: {e}")
                skipped.append((candidate, str(e)))
                continue
            loaded = candidate
            break
        agreed = comm.all_gather(loaded) if comm.get_world_size() > 1 else [loaded]
        if loaded is None or len(set(agreed)) > 1:
            lines = "\n".join(f"  {f}: {why}" for f, why in skipped) or "  (none found)"
            if loaded is not None:
                lines += f"\nprocesses resumed from different files: {agreed}"
            raise CheckpointReadError(
                f"--resume: no checkpoint in {self.save_dir} could be read, so the run stops "
                f"rather than start over and overwrite them:\n{lines}"
            )
        if skipped:
            logger.warning(
                f"--resume: continuing from {loaded}, the newest checkpoint that reads "
                f"({len(skipped)} newer skipped)"
            )
        return result

    def _warn_interrupted_writes(self):
        leftovers = [
            f for f in self.path_manager.ls(self.save_dir) if f.startswith(".") and TMP_MARK in f
        ]
        if leftovers and comm.is_main_process():
            logger.warning(
                f"--resume: {len(leftovers)} incomplete write(s) of an interrupted run in "
                f"{self.save_dir} ({', '.join(sorted(leftovers))}): never renamed into place, "
                "safe to delete"
            )
