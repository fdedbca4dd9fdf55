"""TwoViewMapper and the pre-training loader: the output contract, pixels that match across views,
the shared flip, seeding, colour augmentation, and skipping bad files."""

import logging
import math
import os

import numpy as np
import pytest
import torch
from helpers.images import write_bad_files, write_convertible_files
from helpers.view_geometry import released_anchor_mapping, sample_box, smooth_image
from PIL import Image, ImageOps

from resim_d2 import add_resim_config
from resim_d2.data import MoCoV2ColorAugment, TwoViewMapper, build_pretrain_train_loader
from resim_d2.data.view_geometry import sample_crop_box

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

S = 224


def make_cfg(features=("p3", "p4"), sizes=(32, 48), strides=(24, 32), placement="grid"):
    cfg = get_cfg()
    add_resim_config(cfg)
    cfg.RESIM.REGION.IN_FEATURES = list(features)
    cfg.RESIM.REGION.WINDOW_SIZES = list(sizes)
    cfg.RESIM.REGION.WINDOW_STRIDES = list(strides)
    cfg.RESIM.VIEWS.WINDOW_PLACEMENT = placement
    return cfg


@pytest.fixture(scope="module")
def smooth_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("smooth") / "smooth.png")
    Image.fromarray(smooth_image()).save(path)
    return path


def geometry_only(placement="grid"):
    """A mapper with no colour augmentation, so view pixels can be compared."""
    return TwoViewMapper(
        windows={"p3": (32, 24), "p4": (48, 32)}, placement=placement, color_augment=None
    )


def test_output_contract(smooth_file):
    mapper = TwoViewMapper(make_cfg(), is_train=True)
    out = mapper({"file_name": smooth_file, "image_id": 7}, rng=0)
    for key in ("image_q", "image_k"):
        assert out[key].dtype == torch.uint8 and out[key].shape == (3, S, S)
        assert out[key].is_contiguous()
    assert set(out["windows"]) == {"p3", "p4"}
    for name, m in (("p3", 64), ("p4", 36)):
        w = out["windows"][name]
        assert w["boxes_q"].dtype == w["boxes_k"].dtype == torch.float32
        assert w["boxes_q"].shape == w["boxes_k"].shape == (m, 4)
        assert w["valid"].dtype == torch.bool and w["valid"].shape == (m,)
        assert mapper.num_windows[name] == m
    for key in ("crop_q", "crop_k"):
        assert out[key].dtype == torch.float32 and out[key].shape == (4,)
    assert isinstance(out["flip"], bool)
    assert out["image_size"] == (360, 480)
    assert out["file_name"] == smooth_file and out["image_id"] == 7
    assert out["num_skipped"] == 0
    # a batch stacks
    outs = [mapper({"file_name": smooth_file}, rng=s) for s in range(3)]
    assert torch.stack([o["windows"]["p3"]["boxes_q"] for o in outs]).shape == (3, 64, 4)


def test_res4_default_config_gives_36_windows(smooth_file):
    out = TwoViewMapper(get_cfg_with_defaults())({"file_name": smooth_file}, rng=1)
    assert list(out["windows"]) == ["res4"]
    assert out["windows"]["res4"]["valid"].shape == (36,)


def get_cfg_with_defaults():
    cfg = get_cfg()
    add_resim_config(cfg)
    return cfg


def test_same_seed_same_output(smooth_file):
    mapper = TwoViewMapper(make_cfg(), is_train=True)
    a = mapper({"file_name": smooth_file}, rng=123)
    b = mapper({"file_name": smooth_file}, rng=np.random.default_rng(123))
    c = mapper({"file_name": smooth_file}, rng=124)
    for key in ("image_q", "image_k", "crop_q", "crop_k"):
        assert torch.equal(a[key], b[key])
    for name in a["windows"]:
        for key in ("boxes_q", "boxes_k", "valid"):
            assert torch.equal(a["windows"][name][key], b["windows"][name][key])
    assert not torch.equal(a["image_q"], c["image_q"])


def test_process_rng_is_seeded_from_numpy_global_and_reseeded_after_fork(smooth_file):
    rec = {"file_name": smooth_file}
    np.random.seed(5)
    a = TwoViewMapper(make_cfg())(rec)
    np.random.seed(5)
    mapper = TwoViewMapper(make_cfg())
    b = mapper(rec)
    assert torch.equal(a["image_q"], b["image_q"]) and torch.equal(a["crop_k"], b["crop_k"])
    mapper._rng_pid = -1  # as if this were a freshly forked worker: draws a new seed
    np.random.seed(6)
    c = mapper(rec)
    np.random.seed(6)
    d = TwoViewMapper(make_cfg())(rec)
    assert torch.equal(c["crop_q"], d["crop_q"]) and not torch.equal(c["crop_q"], b["crop_q"])


def test_inference_mode_is_deterministic_per_file_without_colour(smooth_file):
    mapper = TwoViewMapper(make_cfg(), is_train=False)
    assert mapper.color_augment is None
    a, b = mapper({"file_name": smooth_file}), mapper({"file_name": smooth_file})
    assert torch.equal(a["image_q"], b["image_q"]) and torch.equal(a["crop_q"], b["crop_q"])


@pytest.mark.parametrize("placement", ["grid", "overlap"])
def test_windows_show_the_same_pixels_in_both_views(smooth_file, placement):
    original = smooth_image().astype(np.float64)
    mapper = geometry_only(placement)
    errors, direct = [], []
    for seed in range(12):
        out = mapper({"file_name": smooth_file}, rng=seed)
        view_q = out["image_q"].permute(1, 2, 0).numpy()
        view_k = out["image_k"].permute(1, 2, 0).numpy()
        frame = original[:, ::-1] if out["flip"] else original  # crops live in the flipped frame
        crop_q = out["crop_q"].numpy().astype(np.float64)
        for w in out["windows"].values():
            valid = w["valid"].numpy()
            for q, k in zip(w["boxes_q"].numpy()[valid], w["boxes_k"].numpy()[valid]):
                pq = sample_box(view_q, q)
                errors.append(np.abs(pq - sample_box(view_k, k)).mean())
                orig_box = released_anchor_mapping(q, crop_q, (0, 0, S, S))
                direct.append(np.abs(pq - sample_box(frame, orig_box)).mean())
    assert len(errors) > 100
    assert np.mean(errors) < 0.6 and np.max(errors) < 1.2, (np.mean(errors), np.max(errors))
    assert np.mean(direct) < 0.6 and np.max(direct) < 1.2, (np.mean(direct), np.max(direct))


def test_flip_is_shared_and_views_are_crops_of_the_flipped_image(smooth_file):
    original = Image.open(smooth_file).convert("RGB")
    flipped = ImageOps.mirror(original)
    mapper = geometry_only()
    flips = []
    for seed in range(40):
        out = mapper({"file_name": smooth_file}, rng=seed)
        flips.append(out["flip"])
        frame = flipped if out["flip"] else original
        for view, crop in (("image_q", "crop_q"), ("image_k", "crop_k")):
            box = tuple(out[crop].tolist())
            ref = np.asarray(frame.resize((S, S), Image.Resampling.BILINEAR, box=box))
            got = out[view].permute(1, 2, 0).numpy()
            # both views come from the same (flipped or not) frame
            assert np.abs(got.astype(int) - ref).max() <= 1, (seed, view)
    assert 8 < sum(flips) < 32


def test_crop_distribution_matches_torchvision():
    """Area fraction and log aspect ratio against torchvision's RandomResizedCrop.get_params."""
    from torchvision.transforms import RandomResizedCrop

    h, w = 300, 500
    torch.manual_seed(0)
    dummy = torch.empty(3, h, w)
    tv = np.array(
        [RandomResizedCrop.get_params(dummy, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)]
    )  # (top, left, height, width)
    rng = np.random.default_rng(0)
    ours = np.array([sample_crop_box(rng, (h, w)) for _ in range(3000)])
    ours_hw = np.stack([ours[:, 3] - ours[:, 1], ours[:, 2] - ours[:, 0]], 1)
    for stat in (
        lambda hw: hw[:, 0] * hw[:, 1] / (h * w),
        lambda hw: np.log(hw[:, 1] / hw[:, 0]),
    ):
        a, b = stat(tv[:, 2:]), stat(ours_hw)
        for q in (0.1, 0.25, 0.5, 0.75, 0.9):
            assert abs(np.quantile(a, q) - np.quantile(b, q)) < 0.04, q


def test_colour_augment_never_moves_pixels_and_is_seeded():
    base = Image.fromarray(smooth_image(64, 64))
    aug = MoCoV2ColorAugment(jitter_prob=1.0, grayscale_prob=0.0, blur_prob=0.0)
    a = np.asarray(aug(base, np.random.default_rng(0)))
    b = np.asarray(aug(base, np.random.default_rng(0)))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (64, 64, 3)
    # jitter is per-pixel: a pixel permutation commutes with it
    perm = np.random.default_rng(1).permutation(64 * 64)
    shuffled = Image.fromarray(np.asarray(base).reshape(-1, 3)[perm].reshape(64, 64, 3))
    c = np.asarray(aug(shuffled, np.random.default_rng(0)))
    flat_a = a.reshape(-1, 3)[perm].astype(int)
    assert np.abs(c.reshape(-1, 3).astype(int) - flat_a).max() <= 1
    gray = MoCoV2ColorAugment(jitter_prob=0.0, grayscale_prob=1.0, blur_prob=0.0)
    g = np.asarray(gray(base, np.random.default_rng(0)))
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    blur = MoCoV2ColorAugment(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=1.0)
    bl = np.asarray(blur(base, np.random.default_rng(0))).astype(float)
    assert np.abs(bl - np.asarray(base)).mean() < 3  # smooth image: blur changes little
    assert abs(bl.mean() - np.asarray(base).mean()) < 1  # and moves no mass


def test_colour_jitter_statistics_match_torchvision():
    """Mean brightness/contrast spread of jittered views against torchvision's ColorJitter."""
    from torchvision.transforms import ColorJitter

    base = Image.fromarray(smooth_image(48, 48))
    ours = MoCoV2ColorAugment(jitter_prob=1.0, grayscale_prob=0.0, blur_prob=0.0)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    tv = ColorJitter(0.4, 0.4, 0.4, 0.1)
    a = np.array([np.asarray(ours(base, rng)).mean() for _ in range(300)])
    b = np.array([np.asarray(tv(base)).mean() for _ in range(300)])
    assert abs(a.mean() - b.mean()) < 4 and abs(a.std() - b.std()) < 4


def test_bad_files_are_skipped_logged_and_counted(tmp_path, caplog, smooth_file):
    bad = write_bad_files(str(tmp_path))
    mapper = geometry_only()
    with caplog.at_level(logging.WARNING):
        for path in bad.values():
            assert mapper({"file_name": path}) is None
    assert mapper.num_skipped == len(bad)
    for path in bad.values():
        assert os.path.basename(path) in caplog.text
    out = mapper({"file_name": smooth_file}, rng=0)
    assert out["num_skipped"] == len(bad)  # handed to the trainer with the next sample
    assert mapper({"file_name": smooth_file}, rng=0)["num_skipped"] == 0


def test_convertible_files_all_map(tmp_path):
    files = write_convertible_files(str(tmp_path))
    mapper = TwoViewMapper(make_cfg())
    for seed, path in enumerate(files.values()):
        out = mapper({"file_name": path}, rng=seed)
        assert out is not None, path
        assert out["image_q"].shape == (3, S, S)
    assert mapper.num_skipped == 0


def test_pair_without_overlap_is_kept_with_no_valid_window(tmp_path):
    path = str(tmp_path / "wide.png")
    Image.fromarray(smooth_image(300, 1500)).save(path)
    mapper = TwoViewMapper(
        windows={"res4": (48, 32)}, scale=(0.2, 0.3), color_augment=None, flip_prob=0.0
    )
    for seed in range(200):
        out = mapper({"file_name": path}, rng=seed)
        q, k = out["crop_q"].numpy(), out["crop_k"].numpy()
        if q[2] <= k[0] or k[2] <= q[0]:
            break
    else:
        pytest.fail("no disjoint pair found")
    w = out["windows"]["res4"]
    assert not w["valid"].any() and not w["boxes_q"].any() and w["valid"].shape == (36,)


def test_unreadable_dataset_stops_with_a_clear_error(tmp_path):
    bad = write_bad_files(str(tmp_path))
    mapper = TwoViewMapper(windows={"res4": (48, 32)}, max_consecutive_skips=4)
    paths = list(bad.values())
    for path in paths[:3]:
        assert mapper({"file_name": path}) is None
    with pytest.raises(RuntimeError, match="4 records in a row could not be used"):
        mapper({"file_name": paths[3]})


def _loader(cfg, name, batch=4, workers=0):
    cfg.DATASETS.TRAIN = (name,)
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.SEED = 3
    return build_pretrain_train_loader(cfg)


def test_loader_batches_the_demo_images():
    it = iter(_loader(make_cfg(), "resim_demo_images"))
    batch = next(it)
    assert isinstance(batch, list) and len(batch) == 4
    images = torch.stack([d["image_q"] for d in batch])
    assert images.shape == (4, 3, S, S) and images.dtype == torch.uint8
    valid = torch.stack([d["windows"]["p4"]["valid"] for d in batch])
    assert valid.shape == (4, 36)


def test_loader_survives_bad_files_and_refuses_an_unreadable_dataset(tmp_path):
    from resim_d2.data import register_image_folder

    mixed, bad = tmp_path / "mixed", tmp_path / "bad"
    write_bad_files(str(mixed))
    write_convertible_files(str(mixed / "ok"))
    write_bad_files(str(bad))
    for name, root in (("test_resim_mixed", mixed), ("test_resim_allbad", bad)):
        if name not in DatasetCatalog.list():
            register_image_folder(name, str(root))
    it = iter(_loader(make_cfg(), "test_resim_mixed", batch=2))
    seen = set()
    for _ in range(10):
        batch = next(it)
        seen |= {os.path.basename(d["file_name"]) for d in batch}
    assert not seen & {"empty.jpg", "corrupt.jpg", "truncated.jpg", "text.png", "truncated.png"}
    with pytest.raises(RuntimeError, match="records in a row could not be used.*readable"):
        next(iter(_loader(make_cfg(), "test_resim_allbad", batch=2)))


def test_windows_per_feature_follow_the_config():
    cfg = make_cfg(features=("res4",), sizes=(64,), strides=(48,))
    mapper = TwoViewMapper(cfg)
    assert mapper.windows == {"res4": (64, 48)} and mapper.num_windows == {"res4": 16}
    cfg.RESIM.REGION.ENABLED = False
    assert TwoViewMapper(cfg).windows == {}
    cfg = make_cfg(features=("p3", "p4"), sizes=(32,), strides=(24,))
    with pytest.raises(ValueError, match="same length"):
        TwoViewMapper(cfg)
    assert math.isclose(TwoViewMapper(make_cfg()).ratio[1], 4 / 3)


def test_visualize_views_writes_a_png(tmp_path, smooth_file):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "visualize_views.py")
    spec = importlib.util.spec_from_file_location("visualize_views", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = str(tmp_path / "views.png")
    tool.main(
        [
            "--image",
            smooth_file,
            "--out",
            out,
            "--seed",
            "2",
            "RESIM.REGION.IN_FEATURES",
            "['p3','p4']",
            "RESIM.REGION.WINDOW_SIZES",
            "[32,48]",
            "RESIM.REGION.WINDOW_STRIDES",
            "[24,32]",
        ]
    )
    image = Image.open(out)
    assert image.format == "PNG" and image.width == 2 * 2 * S + 3 * 16
    assert image.height > 2 * 2 * S  # the original on top, one row of views per feature


def test_evaluation_views_do_not_depend_on_the_dataset_root(tmp_path, smooth_file):
    import shutil

    from resim_d2.data.two_view_mapper import stable_seed

    a = tmp_path / "root_a" / "cls"
    b = tmp_path / "elsewhere" / "root_b" / "cls"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    shutil.copy(smooth_file, a / "x.png")
    shutil.copy(smooth_file, b / "x.png")
    assert stable_seed(str(a / "x.png"), 3) == stable_seed(str(b / "x.png"), 3)
    assert stable_seed(str(a / "x.png"), 3) != stable_seed(str(a / "x.png"), 4)
    mapper = TwoViewMapper(windows={"res4": (48, 32)}, is_train=False)
    out_a, out_b = mapper({"file_name": str(a / "x.png")}), mapper({"file_name": str(b / "x.png")})
    assert torch.equal(out_a["image_q"], out_b["image_q"])
    assert np.array_equal(out_a["crop_k"], out_b["crop_k"])
