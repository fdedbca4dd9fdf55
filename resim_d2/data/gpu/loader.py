"""Host side of the GPU view path: workers read files and draw parameters, the device does the rest.

``build_gpu_pretrain_loader(cfg)`` is the ``RESIM.VIEWS.BACKEND "gpu"`` counterpart of
:func:`~resim_d2.data.build.build_pretrain_train_loader`; its batches are the same ``list[dict]``
(:class:`~resim_d2.data.two_view_mapper.TwoViewMapper`'s contract) with the images already on the
model's device, so ``ReSim.forward`` takes them unchanged.

Pipeline, per batch::

    workers:  StreamDataset[p] = RawViewReader(record, rng(seed, p))   file bytes + parameters
              GPUViewsCollator(samples)                                 a few large tensors
    device:   GPUViews(packed)                                          decode, crop, colour
              (GPUViewsLoader runs it PREFETCH batches ahead in a thread, on a side CUDA stream)

The stream is :mod:`resim_d2.data.stream`'s (``StreamDataset`` for the record permutation and the
refill of unusable records, ``StreamSampler`` for the positions of each rank and iteration), and
:class:`~resim_d2.data.view_params.ViewParamSampler` draws from the position's generator exactly
what ``TwoViewMapper`` draws: flip, crop_q, crop_k (``sample_view_pair``), then MoCo-v2's colour
parameters of the query view and of the key view (``sample_color_params``), then the windows. So
sample ``p`` has the same record, crops, flip, colour parameters and windows as in the CPU path at
the same seed, ``--resume`` continues the same stream, and the number of workers changes nothing.

Workers decode only what the device cannot (:func:`~resim_d2.data.gpu.decode.probe_jpeg`), with
:func:`~resim_d2.data.image_io.load_rgb_image` as the CPU path; with
``RESIM.GPU_VIEWS.DECODE "worker"`` (default on a CPU device) they decode everything.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import threading
import weakref

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader

from detectron2.data.build import get_detection_dataset_dicts
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..image_io import ImageLoadError, load_rgb_image
from ..skip_report import SkipCollector
from ..skips import MAX_CONSECUTIVE_SKIPS, CountsSkips, SkipCounter
from ..stream import StreamDataset, StreamSampler
from ..view_params import ViewParamSampler
from .decode import probe_jpeg, resolve_decode
from .views import GPUViews

__all__ = [
    "RawViewReader",
    "GPUViewsCollator",
    "GPUViewsLoader",
    "build_gpu_pretrain_loader",
]

logger = logging.getLogger(__name__)


class RawViewReader(CountsSkips):
    """The worker's job for one record: file bytes (or decoded pixels) and the pair's parameters.

    Called as ``reader(record, rng)`` by :class:`~resim_d2.data.stream.StreamDataset`. Returns
    None for an unusable file (logged; the stream refills the position and counts it), else::

        {"data": uint8 (n,) JPEG bytes or None, "pixels": uint8 (H, W, 3) or None,
         "orientation": int, "image_size": (h, w) upright, "file_name", ["image_id"],
         **ViewParamSampler(rng, (h, w))}   # crop_q, crop_k, flip, color, windows
    """

    def __init__(
        self,
        param_sampler: ViewParamSampler,
        decode_in_worker: bool = False,
        max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS,
    ):
        self.param_sampler = param_sampler
        self.decode_in_worker = bool(decode_in_worker)
        # skipped files, reported with the next sample (as TwoViewMapper), and the give-up rule
        self.skips = SkipCounter("RawViewReader", limit=max_consecutive_skips)

    def __repr__(self):
        return (
            f"{type(self).__name__}({self.param_sampler}, "
            f"decode_in_worker={self.decode_in_worker})"
        )

    def _read(self, file_name: str) -> dict | None:
        try:
            with PathManager.open(file_name, "rb") as f:
                data = f.read()
        except OSError:  # the PIL path below meets the same error and reports it, once
            return None
        info = probe_jpeg(data)
        if info is None:
            return None
        height, width, orientation = info
        return {
            "data": np.frombuffer(data, dtype=np.uint8),
            "pixels": None,
            "orientation": orientation,
            "image_size": (height, width),
        }

    def __call__(self, record: dict, rng: np.random.Generator) -> dict | None:
        file_name = record["file_name"]
        sample = None if self.decode_in_worker else self._read(file_name)
        if sample is None:
            try:
                image = load_rgb_image(file_name)
            except ImageLoadError as e:
                self.skips.skip(file_name, str(e))
                return None
            sample = {
                "data": None,
                "pixels": np.asarray(image),
                "orientation": 1,
                "image_size": (image.height, image.width),
            }
        sample.update(self.param_sampler(rng, sample["image_size"]))
        sample["file_name"] = file_name
        if "image_id" in record:
            sample["image_id"] = record["image_id"]
        self.skips.used()
        sample["num_skipped"], sample["skipped"] = self.skips.take()
        return sample


def _concat(chunks: list[np.ndarray | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat uint8 tensor of the non-None arrays and the (n + 1,) offsets of each entry."""
    sizes = [0 if c is None else c.size for c in chunks]
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat = [c.reshape(-1) for c in chunks if c is not None]
    data = np.concatenate(flat) if flat else np.zeros(0, dtype=np.uint8)
    return torch.from_numpy(data), torch.from_numpy(offsets)


class GPUViewsCollator:
    """``collate_fn`` of the workers: B reader samples -> one packed batch of a few large tensors.

    Few tensors cross the process boundary per batch (a batch of per-sample tensors would cost
    one shared-memory segment each). Output::

        {"data": uint8 (total bytes,), "data_offsets": int64 (B + 1,),
         "pixels": uint8 (total,), "pixel_offsets": int64 (B + 1,),  # worker-decoded (H, W, 3)
         "decoded": bool (B,), "image_sizes": int64 (B, 2) upright (h, w),
         "orientations": int64 (B,), "crops": float64 (B, 2, 4) query/key, "flips": bool (B,),
         "colors": float64 (B, 2, NUM_COLOR_PARAMS),
         "windows": {feature: {"boxes_q": float32 (B, M, 4), "boxes_k": ..., "valid": bool (B, M)}},
         "num_skipped": int64 (B,), "skipped": [[(file_name, reason)]] * B,
         "stream_positions": int64 (B,), "file_names": [str] * B, "image_ids": [id or None] * B}
    """

    def __call__(self, samples: list[dict]) -> dict:
        data, data_offsets = _concat([s["data"] for s in samples])
        pixels, pixel_offsets = _concat([s["pixels"] for s in samples])
        features = samples[0]["windows"].keys() if samples else ()
        windows = {
            f: {
                key: torch.from_numpy(np.stack([s["windows"][f][n] for s in samples]))
                for n, key in enumerate(("boxes_q", "boxes_k", "valid"))
            }
            for f in features
        }
        return {
            "data": data,
            "data_offsets": data_offsets,
            "pixels": pixels,
            "pixel_offsets": pixel_offsets,
            "decoded": torch.tensor([s["pixels"] is not None for s in samples], dtype=torch.bool),
            "image_sizes": torch.tensor([s["image_size"] for s in samples], dtype=torch.int64),
            "orientations": torch.tensor([s["orientation"] for s in samples], dtype=torch.int64),
            "crops": torch.from_numpy(
                np.stack([np.stack([s["crop_q"], s["crop_k"]]) for s in samples])
            ),
            "flips": torch.tensor([bool(s["flip"]) for s in samples], dtype=torch.bool),
            "colors": torch.from_numpy(np.stack([s["color"] for s in samples])),
            "windows": windows,
            "num_skipped": torch.tensor([s.get("num_skipped", 0) for s in samples]),
            "skipped": [s.get("skipped", []) for s in samples],
            "stream_positions": torch.tensor([s.get("stream_position", -1) for s in samples]),
            "file_names": [s["file_name"] for s in samples],
            "image_ids": [s.get("image_id") for s in samples],
        }


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


# prefetch threads still running: stopped and joined at exit, before the interpreter (and torch's
# thread pools) go away under them
_LIVE_THREADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@atexit.register
def _stop_prefetch_threads():
    for thread, stop in list(_LIVE_THREADS.items()):
        stop.set()
        thread.join(timeout=10)


class GPUViewsLoader(SkipCollector):
    """Iterable of ``list[dict]`` batches: a DataLoader of packed batches, made into views by
    :class:`GPUViews` on the device.

    With ``prefetch > 0`` a background thread makes up to ``prefetch`` batches ahead, on its own
    CUDA stream, so decoding and augmentation overlap the training step; the consumer's stream
    waits for each batch's event and its tensors are recorded on that stream. ``prefetch=0`` runs
    on the caller's thread and stream.
    """

    def __init__(self, data_loader, views: GPUViews, prefetch: int = 1):
        super().__init__()  # collects the files the workers skipped (SkipCollector)
        self.data_loader = data_loader
        self.views = views
        self.prefetch = int(prefetch)

    def __repr__(self):
        return f"{type(self).__name__}({self.views}, prefetch={self.prefetch})"

    def __iter__(self):
        if self.prefetch <= 0:
            for packed in self.data_loader:
                batch = self._views(packed)
                if batch is not None:
                    yield self.note(batch)
            return
        for batch in self._threaded():
            yield self.note(batch)

    def _views(self, packed: dict) -> list[dict] | None:
        """The batch's views; None for a batch of which no image could be used (dropped)."""
        return self.views(packed)

    def _threaded(self):
        device = self.views.device
        cuda = device.type == "cuda"
        results: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item):
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                stream = None
                if cuda:
                    torch.cuda.set_device(device)
                    stream = torch.cuda.Stream(device)
                for packed in self.data_loader:
                    ctx = torch.cuda.stream(stream) if cuda else contextlib.nullcontext()
                    with ctx:
                        batch = self._views(packed)
                        if batch is None:
                            continue
                        event = torch.cuda.Event() if cuda else None
                        if cuda:
                            event.record(stream)
                    if not put((batch, event)):
                        return
            except BaseException as e:  # noqa: BLE001  handed to the consumer
                put(_Failure(e))

        thread = threading.Thread(target=work, name="GPUViewsLoader", daemon=True)
        _LIVE_THREADS[thread] = stop
        thread.start()
        try:
            while True:
                item = results.get()
                if isinstance(item, _Failure):
                    raise item.error
                batch, event = item
                if event is not None:
                    current = torch.cuda.current_stream(device)
                    current.wait_event(event)
                    _record_stream(batch, current)
                yield batch
        finally:
            stop.set()


def _record_stream(batch: list[dict], stream) -> None:
    """Mark the batch's device tensors (made on a side stream) as used on ``stream``."""
    seen = set()
    for d in batch:
        tensors = [d["image_q"], d["image_k"]]
        tensors += [t for w in d["windows"].values() for t in w.values()]
        for t in tensors:  # views of a few tensors: record each storage once
            ptr = t.untyped_storage().data_ptr()
            if t.is_cuda and ptr not in seen:
                seen.add(ptr)
                t.record_stream(stream)


def build_gpu_pretrain_loader(cfg, start_iter=0, seed=None, dataset=None, device=None):
    """The infinite pre-training loader of the GPU view path (``RESIM.VIEWS.BACKEND "gpu"``).

    Args:
        cfg: a config with resim_d2's keys; uses DATASETS.TRAIN, SOLVER.IMS_PER_BATCH,
            DATALOADER.NUM_WORKERS, SEED, MODEL.DEVICE, RESIM.VIEWS and RESIM.GPU_VIEWS.
        start_iter: iteration the stream starts at (``--resume`` passes the checkpoint's).
        seed: stream seed; defaults to ``cfg.SEED`` (a seed shared by all processes if negative).
        dataset: a list of dataset dicts; defaults to the concatenation of ``cfg.DATASETS.TRAIN``.
        device: where views are made; defaults to ``cfg.MODEL.DEVICE`` (the model's device).

    Returns:
        :class:`GPUViewsLoader` (a :class:`SkipCollector`): batches are ``list[dict]``
        of ``SOLVER.IMS_PER_BATCH / world_size`` samples in TwoViewMapper's contract, images on
        ``device``; sample ``p`` of the stream depends only on ``(seed, p)``, with the CPU path's
        parameters.
    """
    if dataset is None:
        dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    if seed is None:
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    device = torch.device(device if device is not None else cfg.MODEL.DEVICE)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    decode = resolve_decode(cfg.RESIM.GPU_VIEWS.DECODE, device)
    param_sampler = ViewParamSampler.from_config(cfg)
    limit = cfg.RESIM.VIEWS.MAX_CONSECUTIVE_SKIPS
    reader = RawViewReader(
        param_sampler, decode_in_worker=decode == "worker", max_consecutive_skips=limit
    )
    reader.log_skips = False  # the files travel with the batches (SkipReportingLoader)
    sampler = StreamSampler(cfg.SOLVER.IMS_PER_BATCH, start_iter=start_iter)
    local_batch = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
    workers = cfg.DATALOADER.NUM_WORKERS
    loader = DataLoader(
        StreamDataset(dataset, reader, seed),
        batch_sampler=BatchSampler(sampler, local_batch, drop_last=True),
        num_workers=workers,
        collate_fn=GPUViewsCollator(),
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    views = GPUViews.from_config(cfg, device=device, param_sampler=param_sampler, seed=seed)
    logger.info(f"GPU view path: {reader}, {views}, decode on {decode}")
    return GPUViewsLoader(loader, views, prefetch=cfg.RESIM.GPU_VIEWS.PREFETCH)
