"""The GPU view path (run on the CPU device here) against independent references: the CPU path's
parameters and distributions, PIL's resampling, torchvision.transforms.v2.functional's colour ops,
PIL's EXIF orientation, and the ReSim model's input contract."""

import io
import math
import os

import numpy as np
import pytest
import torch
from helpers.images import write_bad_files
from helpers.resim_model import tiny_resim_cfg
from helpers.view_geometry import released_grid_valid, smooth_image
from PIL import Image, ImageFilter
from scipy import stats

from resim_d2 import add_resim_config
from resim_d2.data import gpu_views
from resim_d2.data.build import build_pretrain_train_loader
from resim_d2.data.color_augment import MoCoV2ColorAugment
from resim_d2.data.gpu import colour as gpu_colour
from resim_d2.data.gpu_loader import (
    GPUViewsCollator,
    RawViewReader,
    build_gpu_pretrain_loader,
    probe_jpeg,
)
from resim_d2.data.gpu_views import (
    NUM_COLOR_PARAMS,
    P_BLUR,
    P_GRAY,
    P_JITTER,
    P_ORDER,
    P_SIGMA,
    GPUViews,
    ViewParamSampler,
    apply_exif_orientation,
    color_augment_views,
    default_blur_kernel_size,
    resample_views,
    sample_color_params,
)
from resim_d2.data.image_io import load_rgb_image
from resim_d2.data.stream import StreamDataset
from resim_d2.data.two_view_mapper import TwoViewMapper, render_view
from resim_d2.data.view_geometry import sample_crop_box

from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage

S = 64  # view side of these tests (tiny_cfg's model works on 64 x 64 views)
SIZES = [(120, 90), (90, 120), (150, 200), (100, 160), (80, 80), (130, 70), (96, 128), (75, 110)]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _image(h, w, seed):
    """A smooth, colourful image with per-file phase shifts (no two files alike)."""
    rng = np.random.default_rng(seed)
    big = smooth_image(h + 40, w + 40)
    dy, dx = rng.integers(0, 40, 2)
    return np.ascontiguousarray(big[dy : dy + h, dx : dx + w])


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Records: JPEGs of several sizes, an EXIF-rotated, a grayscale and a CMYK JPEG, a PNG."""
    root = tmp_path_factory.mktemp("gpu_views")
    files = []
    for i, (h, w) in enumerate(SIZES):
        files.append(str(root / f"{i}.jpg"))
        Image.fromarray(_image(h, w, i)).save(files[-1], quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6
    files.append(str(root / "rot.jpg"))
    Image.fromarray(_image(90, 140, 20)).save(files[-1], quality=92, exif=exif.tobytes())
    files.append(str(root / "gray.jpg"))
    Image.fromarray(_image(100, 100, 21)[..., 1]).save(files[-1], quality=92)
    files.append(str(root / "photo.png"))
    Image.fromarray(_image(110, 85, 22)).save(files[-1])
    files.append(str(root / "cmyk.jpg"))
    Image.fromarray(_image(70, 90, 23)).convert("CMYK").save(files[-1], quality=92)
    return [{"file_name": f, "image_id": i} for i, f in enumerate(files)]


def make_cfg(batch=8, decode="worker"):
    """tiny_cfg's ReSim-FPN (p3 16/12, p4 32/16) with S = 64 views and the GPU view path."""
    cfg = tiny_resim_cfg("fpn")
    cfg.RESIM.VIEWS.SIZE = S
    cfg.RESIM.VIEWS.BACKEND = "gpu"
    cfg.RESIM.GPU_VIEWS.DECODE = decode
    cfg.RESIM.GPU_VIEWS.PREFETCH = 0
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def gpu_loader(cfg, records, seed, **kw):
    return build_gpu_pretrain_loader(cfg, dataset=records, seed=seed, device="cpu", **kw)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- parameters
class Recorder:
    """A numpy Generator that records every draw: (method, result)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.calls = []

    def __getattr__(self, name):
        method = getattr(self.rng, name)

        def call(*args, **kw):
            out = method(*args, **kw)
            self.calls.append((name, np.array(out).tolist()))
            return out

        return call


@pytest.mark.parametrize("jitter", [(0.4, 0.4, 0.4, 0.1), (0.4, 0.0, 0.3, 0.0)])
def test_colour_parameters_are_the_cpu_paths_draws(jitter):
    augment = MoCoV2ColorAugment(jitter=jitter)
    image = Image.fromarray(smooth_image(8, 8))
    ranges = (augment.brightness, augment.contrast, augment.saturation, augment.hue)
    for seed in range(150):
        ref, ours = Recorder(seed), Recorder(seed)
        augment(image, ref)
        p = sample_color_params(augment, ours)
        assert ours.calls == ref.calls
        draws = iter(ref.calls)
        name, u = next(draws)
        assert (p[P_JITTER] == 1) == (u < augment.jitter_prob)
        if p[P_JITTER]:
            _, order = next(draws)
            assert p[P_ORDER : P_ORDER + 4].tolist() == order
            for op in order:
                if ranges[op] is not None:
                    assert p[gpu_views.P_BRIGHTNESS + op] == next(draws)[1]
        assert (p[P_GRAY] == 1) == (next(draws)[1] < augment.grayscale_prob)
        assert (p[P_BLUR] == 1) == (next(draws)[1] < augment.blur_prob)
        if p[P_BLUR]:
            assert p[P_SIGMA] == next(draws)[1]


def test_same_seed_gives_the_cpu_paths_records_crops_flips_and_windows(records):
    cfg = make_cfg()
    cpu = StreamDataset(records, TwoViewMapper(cfg, is_train=True), seed=11)
    ours = StreamDataset(records, RawViewReader(ViewParamSampler.from_config(cfg)), seed=11)
    for p in range(2 * len(records)):
        a, b = cpu[p], ours[p]
        assert a["file_name"] == b["file_name"] and a["image_size"] == b["image_size"]
        assert np.array_equal(a["crop_q"].numpy(), b["crop_q"].astype(np.float32))
        assert np.array_equal(a["crop_k"].numpy(), b["crop_k"].astype(np.float32))
        assert a["flip"] == b["flip"]
        assert set(a["windows"]) == set(b["windows"]) == {"p3", "p4"}
        for f, (bq, bk, valid) in b["windows"].items():
            assert np.array_equal(a["windows"][f]["boxes_q"].numpy(), bq)
            assert np.array_equal(a["windows"][f]["boxes_k"].numpy(), bk)
            assert np.array_equal(a["windows"][f]["valid"].numpy(), valid)


def test_loader_batches_match_the_cpu_loader(records):
    """Whole batches at one seed: same samples, parameters and windows; pixels close (the colour
    ops differ only in PIL's rounding and blur approximation); EXIF-rotated sizes upright."""
    cfg = make_cfg(batch=len(records))
    cfg.SEED = 4
    (a,) = _take(build_pretrain_train_loader(cfg, dataset=records), 1)
    (b,) = _take(build_gpu_pretrain_loader(cfg, dataset=records, device="cpu"), 1)
    for x, y in zip(a, b):
        assert set(y) >= set(x) - {"image_id"} and y["image_id"] == x["image_id"]
        for key in ("file_name", "image_size", "flip", "num_skipped", "stream_position"):
            assert x[key] == y[key], key
        for key in ("crop_q", "crop_k"):
            assert torch.equal(x[key], y[key])
        for f in x["windows"]:
            for key in ("boxes_q", "boxes_k", "valid"):
                assert torch.equal(x["windows"][f][key], y["windows"][f][key])
        for key in ("image_q", "image_k"):
            assert y[key].dtype == torch.uint8 and y[key].shape == (3, S, S)
            assert (x[key].float() - y[key].float()).abs().mean() < 3.0
    rot = next(y for y in b if y["file_name"].endswith("rot.jpg"))
    assert rot["image_size"] == (140, 90)


def test_gpu_path_windows_follow_the_released_validity_rule(records):
    """The masks the GPU loader hands the model are the released code's (re-typed) for the crops
    it drew: far edges strictly inside the key view."""
    cfg = make_cfg(batch=len(records))
    r = cfg.RESIM.REGION
    checked = 0
    for batch in _take(gpu_loader(cfg, records, seed=8), 3):
        for d in batch:
            crop_q = tuple(float(v) for v in d["crop_q"])
            crop_k = tuple(float(v) for v in d["crop_k"])
            for f, w, s in zip(r.IN_FEATURES, r.WINDOW_SIZES, r.WINDOW_STRIDES):
                ref = released_grid_valid(crop_q, crop_k, w, s, img_size=float(S))
                assert np.array_equal(d["windows"][f]["valid"].cpu().numpy(), ref)
                checked += int(ref.sum())
    assert checked > 100


# ----------------------------------------------------------------------------- statistics
def _rates(batches):
    """Per view: crop area fraction, log aspect ratio; per pair: flip; per view: grayscale."""
    scale, log_ratio, flips, gray = [], [], [], []
    for d in (d for batch in batches for d in batch):
        h, w = d["image_size"]
        for crop in (d["crop_q"], d["crop_k"]):
            cw, ch = float(crop[2] - crop[0]), float(crop[3] - crop[1])
            scale.append(cw * ch / (h * w))
            log_ratio.append(math.log(cw / ch))
        flips.append(d["flip"])
        for key in ("image_q", "image_k"):
            x = d[key]
            gray.append(bool(torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])))
    return np.array(scale), np.array(log_ratio), np.array(flips), np.array(gray)


def test_distributions_match_the_cpu_path(records, monkeypatch):
    """Two-sample tests at fixed seeds (different for the two paths): crop scale and aspect
    ratio (KS), flip, grayscale and blur rates (Fisher); the GPU rates also against nominal."""
    recs = records[:8]  # colourful RGB JPEGs: a grayscale view is one the augmentation made
    n_batches, batch = 6, 40
    cfg = make_cfg(batch=batch)
    cpu_blurs, gpu_blurs = [], []
    pil_blur = ImageFilter.GaussianBlur

    def counting_pil_blur(radius):
        cpu_blurs.append(radius)
        return pil_blur(radius=radius)

    real_blur = gpu_views.gaussian_blur

    def counting_blur(x, sigma, kernel_size):
        gpu_blurs.extend(sigma.tolist())
        return real_blur(x, sigma, kernel_size)

    monkeypatch.setattr(ImageFilter, "GaussianBlur", counting_pil_blur)
    monkeypatch.setattr(gpu_colour, "gaussian_blur", counting_blur)  # where the path calls it
    ds = StreamDataset(recs, TwoViewMapper(cfg, is_train=True), seed=101)
    cpu = [[ds[i * batch + j] for j in range(batch)] for i in range(n_batches)]
    gpu = _take(gpu_loader(cfg, recs, seed=202), n_batches)
    n_views = 2 * n_batches * batch
    a, b = _rates(cpu), _rates(gpu)
    assert stats.ks_2samp(a[0], b[0]).pvalue > 0.01  # crop area fraction
    assert stats.ks_2samp(a[1], b[1]).pvalue > 0.01  # log aspect ratio
    assert abs(b[1]).max() <= math.log(4 / 3) + 0.05 and b[0].min() >= 0.15
    for hits_a, hits_b, n, nominal in (
        (a[2].sum(), b[2].sum(), n_views // 2, 0.5),  # flip, per pair
        (a[3].sum(), b[3].sum(), n_views, 0.2),  # grayscale, per view
        (len(cpu_blurs), len(gpu_blurs), n_views, 0.5),  # blur, per view
    ):
        table = [[hits_a, n - hits_a], [hits_b, n - hits_b]]
        assert stats.fisher_exact(table).pvalue > 0.01, table
        assert stats.binomtest(int(hits_b), n, nominal).pvalue > 0.01, (hits_b, n, nominal)
    assert stats.ks_2samp(cpu_blurs, gpu_blurs).pvalue > 0.01  # sigma
    assert 0.1 <= min(gpu_blurs) and max(gpu_blurs) <= 2.0


# ----------------------------------------------------------------------------- pixels
def _views_vs_render_view(arrays, seed, size):
    rng = np.random.default_rng(seed)
    images = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
    crops = np.stack(
        [
            [sample_crop_box(rng, a.shape[:2], (0.05, 1.0), (0.3, 3.0)) for _ in range(2)]
            for a in arrays
        ]
    )
    flips = rng.random(len(arrays)) < 0.5
    views = GPUViews(view_size=size, device="cpu").render(images, crops, flips, None)
    errors = []
    for i, a in enumerate(arrays):
        for v in range(2):
            ref = np.asarray(render_view(Image.fromarray(a), crops[i, v], flips[i], size))
            errors.append(np.abs(views[i, v].permute(1, 2, 0).numpy().astype(int) - ref))
    return np.stack([e.max() for e in errors]), np.stack([e.mean() for e in errors])


def test_fixed_crops_and_flips_give_render_views_pixels():
    """Same decoded pixels, crops and flips, no colour: |GPU - PIL| <= 1 grey level per pixel,
    mean < 0.3 (PIL rounds to 8 bit between its two passes, this path once at the end)."""
    rng = np.random.default_rng(0)
    smooth = [_image(h, w, i) for i, (h, w) in enumerate(SIZES)] + [_image(375, 500, 9)]
    noise = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES[:4]]
    for arrays, size in ((smooth, S), (noise, S), (smooth[-1:], 224)):
        worst, mean = _views_vs_render_view(arrays, 1, size)
        assert worst.max() <= 1 and mean.max() < 0.3, (worst, mean)


def test_resampling_handles_any_box_and_batch_order():
    """Groups of different region sizes, non-integer and 1-pixel boxes, upscaling; each image's
    views equal those of resampling it alone."""
    rng = np.random.default_rng(3)
    arrays = [_image(h, w, i) for i, (h, w) in enumerate([(40, 300), (200, 30), (37, 41), (1, 1)])]
    boxes = np.array(
        [
            [[10.5, 3.25, 290.0, 39.0], [0.0, 0.0, 1.0, 1.0]],
            [[2.0, 50.0, 28.0, 190.5], [0.0, 0.0, 30.0, 200.0]],
            [[5.0, 5.0, 9.0, 9.0], [0.0, 0.0, 41.0, 37.0]],
            [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]],
        ]
    )
    mirror = rng.random((4, 2)) < 0.5
    images = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
    together = resample_views(images, boxes, 24, mirror, max_waste=1.0)
    for i in range(4):
        alone = resample_views(images[i : i + 1], boxes[i : i + 1], 24, mirror[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-3)
        for v in range(2):
            ref = Image.fromarray(arrays[i]).resize(
                (24, 24), Image.BILINEAR, box=tuple(boxes[i, v])
            )
            ref = np.asarray(ref.transpose(Image.FLIP_LEFT_RIGHT) if mirror[i, v] else ref)
            got = together[i, v].permute(1, 2, 0).round().numpy()
            assert np.abs(got - ref).max() <= 1
    assert (together[3] == torch.from_numpy(arrays[3][0, 0]).float().view(1, 3, 1, 1)).all()


def test_device_decode_matches_pil_decode(records):
    """torchvision's decoder (nvJPEG on CUDA; libjpeg-turbo here) against PIL's, same parameters:
    identical on the CPU; orientation applied on the tensor."""
    cfg = make_cfg(batch=len(records))
    (a,) = _take(gpu_loader(cfg, records, seed=9), 1)
    cfg.RESIM.GPU_VIEWS.DECODE = "device"
    (b,) = _take(gpu_loader(cfg, records, seed=9), 1)
    for x, y in zip(a, b):
        assert x["file_name"] == y["file_name"] and x["image_size"] == y["image_size"]
        for key in ("image_q", "image_k"):
            assert (x[key].float() - y[key].float()).abs().mean() < 1.0, x["file_name"]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(tmp_path, orientation):
    array = _image(6, 9, orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = str(tmp_path / "o.png")  # lossless, so the pixels compare exactly
    Image.fromarray(array).save(path, exif=exif.tobytes())
    ref = torch.from_numpy(np.array(load_rgb_image(path))).permute(2, 0, 1)
    assert torch.equal(
        apply_exif_orientation(torch.from_numpy(array).permute(2, 0, 1), orientation), ref
    )
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", exif=exif.tobytes())
    assert probe_jpeg(buf.getvalue()) == (*ref.shape[1:], orientation)


# ----------------------------------------------------------------------------- colour
def _tvf_reference(x, p, kernel_size):
    """One view through torchvision.transforms.v2.functional, in MoCoV2ColorAugment's order."""
    import torchvision.transforms.v2.functional as TF

    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    if p[P_JITTER]:
        for op in p[P_ORDER : P_ORDER + 4].astype(int):
            x = ops[op](x, float(p[gpu_views.P_BRIGHTNESS + op]))
    if p[P_GRAY]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p[P_BLUR]:
        x = TF.gaussian_blur(x, [kernel_size, kernel_size], [float(p[P_SIGMA])] * 2)
    return x


def test_colour_ops_with_fixed_factors_match_torchvision_per_image():
    import torchvision.transforms.v2.functional as TF

    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 20, 24, generator=g)
    x[0] = x[0, :1]  # a gray image (hue/saturation undefined)
    f = torch.tensor([0.6, 1.4, 1.0, 0.0, 1.2])
    h = torch.tensor([-0.5, -0.1, 0.0, 0.07, 0.5])
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    for ours, theirs, factor in (
        (gpu_views.adjust_brightness, TF.adjust_brightness, f),
        (gpu_views.adjust_contrast, TF.adjust_contrast, f),
        (gpu_views.adjust_saturation, TF.adjust_saturation, f),
        (gpu_views.adjust_hue, TF.adjust_hue, h),
    ):
        ref = torch.stack([theirs(x[i], float(factor[i])) for i in range(5)])
        torch.testing.assert_close(ours(x, factor), ref, rtol=0, atol=2e-6)
    ref = torch.stack([TF.rgb_to_grayscale(x[i], 1) for i in range(5)])
    torch.testing.assert_close(gpu_views.rgb_to_grayscale(x), ref, rtol=0, atol=1e-7)
    for k in (3, 13, 23):
        ref = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2) for i in range(5)])
        torch.testing.assert_close(gpu_views.gaussian_blur(x, sigma, k), ref, rtol=0, atol=2e-6)


def test_colour_augment_applies_each_views_order_and_flags():
    rng = np.random.default_rng(5)
    augment = MoCoV2ColorAugment()
    params = np.stack([sample_color_params(augment, rng) for _ in range(40)])
    params[:4, P_JITTER] = 1  # make sure orders and flags vary
    params[:4, P_ORDER : P_ORDER + 4] = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]]
    params[:4, gpu_views.P_BRIGHTNESS : gpu_views.P_HUE + 1] = [1.3, 0.7, 1.4, -0.08]
    x = torch.rand(40, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    k = default_blur_kernel_size(24, 2.0)
    ref = torch.stack([_tvf_reference(x[i], params[i], k) for i in range(40)])
    torch.testing.assert_close(color_augment_views(x.clone(), params, k), ref, rtol=0, atol=1e-5)
    assert default_blur_kernel_size(224, 2.0) == 23 and default_blur_kernel_size(64, 2.0) == 13
    assert params.shape[1] == NUM_COLOR_PARAMS


# ----------------------------------------------------------------------------- the loader
def test_one_gpu_path_batch_trains_the_resim_model(records):
    from resim_d2.modeling import ReSim

    from detectron2.modeling import build_model

    cfg = make_cfg(batch=4)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, ReSim)
    model.train()
    (batch,) = _take(gpu_loader(cfg, records, seed=3), 1)
    assert all(d["image_q"].device == model.device for d in batch)
    with EventStorage():
        out = model(batch)
    assert set(out) == {"loss_global", "loss_region_p3", "loss_region_p4"}
    loss = sum(out.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert float(model.last_metrics["region_p4/valid_per_image"]) > 0
    # each image's windows are rows of one batch tensor, which the model takes without stacking
    from resim_d2.modeling.region_branch import RegionWindows, _rows_of_one_tensor

    for f in ("p3", "p4"):
        for key in ("boxes_q", "boxes_k", "valid"):
            rows = [d["windows"][f][key] for d in batch]
            whole = _rows_of_one_tensor(rows)
            assert whole is not None and whole.shape[0] == 4
            assert all(row.data_ptr() == whole[i].data_ptr() for i, row in enumerate(rows))
        got = RegionWindows.from_inputs(batch, f, model.device)
        valid = torch.stack([d["windows"][f]["valid"] for d in batch])
        torch.testing.assert_close(got.valid, valid)
        boxes = torch.stack([d["windows"][f]["boxes_q"] for d in batch])
        torch.testing.assert_close(got.boxes_q, torch.where(valid[..., None], boxes, 0.0))


def test_resume_prefetch_and_workers_do_not_change_the_stream(records):
    cfg = make_cfg(batch=4)

    def key(batches):
        return [
            [(d["file_name"], d["image_q"].sum().item(), d["flip"]) for d in b] for b in batches
        ]

    full = key(_take(gpu_loader(cfg, records, seed=7), 3))
    assert key(_take(gpu_loader(cfg, records, seed=7, start_iter=2), 1)) == full[2:3]
    cfg.RESIM.GPU_VIEWS.PREFETCH = 2
    cfg.DATALOADER.NUM_WORKERS = 2
    assert key(_take(gpu_loader(cfg, records, seed=7), 3)) == full
    assert key(_take(gpu_loader(cfg, records, seed=8), 1)) != full[:1]


def test_bad_files_are_skipped_or_replaced_and_counted(tmp_path, records):
    bad = write_bad_files(str(tmp_path / "bad"))
    good = open(records[0]["file_name"], "rb").read()
    corrupt = str(tmp_path / "corrupt_scan.jpg")  # header and end marker fine, scan data noise
    noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    with open(corrupt, "wb") as f:
        f.write(good[:700] + noise + b"\xff\xd9")
    assert probe_jpeg(open(corrupt, "rb").read()) is not None  # so it reaches the device decoder
    recs = records[:3] + [{"file_name": p} for p in [*bad.values(), corrupt]]
    cfg = make_cfg(batch=8, decode="device")
    names, skipped = set(), 0
    loader = gpu_loader(cfg, recs, seed=1)
    for batch in _take(loader, 3):
        names |= {d["file_name"] for d in batch}
        skipped += sum(d["num_skipped"] for d in batch)
        assert all(d["image_q"].shape == (3, S, S) for d in batch)
    assert names <= {r["file_name"] for r in records[:3]}
    assert loader.views.num_replaced >= 1  # the corrupt scan: device and PIL both refused it
    assert skipped >= len(bad) + loader.views.num_replaced


def test_prefetch_thread_hands_on_errors():
    class Failing:
        def __iter__(self):
            raise OSError("disk gone")

    from resim_d2.data.gpu_loader import GPUViewsLoader

    loader = GPUViewsLoader(Failing(), GPUViews(view_size=S, device="cpu"), prefetch=1)
    with pytest.raises(OSError, match="disk gone"):
        next(iter(loader))


def test_collator_packs_a_batch_into_few_tensors(records):
    reader = RawViewReader(ViewParamSampler.from_config(make_cfg()))
    samples = [reader(r, np.random.default_rng(i)) for i, r in enumerate(records)]
    packed = GPUViewsCollator()(samples)
    tensors = [v for v in packed.values() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 12
    decoded = packed["decoded"].tolist()
    assert decoded == [
        os.path.basename(r["file_name"]) in ("photo.png", "cmyk.jpg") for r in records
    ]
    assert packed["windows"]["p3"]["boxes_q"].shape[:2] == (len(records), 16)
    assert packed["colors"].shape == (len(records), 2, NUM_COLOR_PARAMS)


def test_config_keys():
    cfg = get_cfg()
    add_resim_config(cfg)
    assert cfg.RESIM.VIEWS.BACKEND == "cpu"
    g = cfg.RESIM.GPU_VIEWS
    assert (g.DECODE, g.BLUR_KERNEL_SIZE, g.PREFETCH) == ("auto", 0, 1)


def test_trainer_dispatches_on_the_views_backend(records):
    """Needs the dispatch on RESIM.VIEWS.BACKEND in engine/trainer.py (build_train_loader)."""
    from resim_d2.data.gpu_loader import GPUViewsLoader
    from resim_d2.engine.trainer import Trainer

    from detectron2.data import DatasetCatalog

    name = "test_gpu_views_records"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: records)
    cfg = make_cfg(batch=4)
    cfg.DATASETS.TRAIN = (name,)
    loader = Trainer.build_train_loader(cfg, start_iter=1, seed=3)
    assert isinstance(loader, GPUViewsLoader)
    assert [d["stream_position"] for d in next(iter(loader))] == [4, 5, 6, 7]
    cfg.RESIM.VIEWS.BACKEND = "cpu"
    assert not isinstance(Trainer.build_train_loader(cfg), GPUViewsLoader)
