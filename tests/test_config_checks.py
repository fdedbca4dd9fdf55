"""Settings that leave a whole branch idle stop the run at start (or warn), naming the keys."""

import glob
import logging
import os

import numpy as np
import pytest
from helpers.train_net_runner import REPO, TINY, train_net
from PIL import Image

from resim_d2 import add_resim_config, get_config_file
from resim_d2.config_checks import ConfigError, check_config, config_problems
from resim_d2.data.two_view_mapper import TwoViewMapper
from resim_d2.utils.projects import add_project_configs

from detectron2.config import get_cfg


def demo_cfg(*opts):
    cfg = add_resim_config(get_cfg())
    cfg.merge_from_file(get_config_file("pretrain/demo_resim_c4_cpu.yaml"))
    cfg.merge_from_list(list(opts))
    return cfg


def test_shipped_configs_pass():
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)):
        if os.path.basename(path).startswith("Base-"):
            continue
        cfg = add_resim_config(get_cfg())
        try:
            add_project_configs(cfg, path)
        except Exception:  # noqa: BLE001  DensePose configs need detectron2's DensePose project
            continue
        cfg.merge_from_file(path)
        assert config_problems(cfg) == ([], []), path


@pytest.mark.parametrize(
    "opts, keys",
    [
        # 256-px windows in 128-px views: no window exists in any view pair
        (["RESIM.REGION.WINDOW_SIZES", [256]], ["RESIM.REGION.WINDOW_SIZES", "RESIM.VIEWS.SIZE"]),
        (["RESIM.REGION.IN_FEATURES", []], ["RESIM.REGION.IN_FEATURES"]),
        (
            ["RESIM.REGION.LOSS_WEIGHTS", [0.0], "RESIM.GLOBAL.LOSS_WEIGHT", 0.0],
            ["RESIM.GLOBAL.LOSS_WEIGHT", "RESIM.REGION.LOSS_WEIGHTS"],
        ),
        (
            ["RESIM.REGION.ENABLED", False, "RESIM.GLOBAL.LOSS_WEIGHT", 0.0],
            ["RESIM.GLOBAL.LOSS_WEIGHT", "RESIM.REGION.ENABLED"],
        ),
        (["RESIM.GLOBAL.LOSS_WEIGHT", -1.0], ["RESIM.GLOBAL.LOSS_WEIGHT"]),
        (["RESIM.MOCO.QUEUE_SIZE", 0], ["RESIM.MOCO.QUEUE_SIZE"]),
        # res4 of 32-px views is a 2x2 map: a 3x3 pooling kernel has nowhere to go
        (
            ["RESIM.VIEWS.SIZE", 32, "RESIM.REGION.WINDOW_SIZES", [16]],
            ["RESIM.REGION.NEG_POOL_KERNELS", "RESIM.VIEWS.SIZE"],
        ),
        (["SOLVER.BASE_LR", 0.0, "RESIM.SCHEDULE.LR_PER_256", 0.0], ["SOLVER.BASE_LR"]),
    ],
)
def test_settings_that_can_never_work_are_errors(opts, keys):
    cfg = demo_cfg(*opts)
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    for key in keys:
        assert key in str(e.value), (key, str(e.value))


def test_windows_that_never_fit_give_no_window_in_any_view_pair(tmp_path):
    """The reference for the first error: the mapper itself finds no window, ever."""
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)).save(path)
    cfg = demo_cfg("RESIM.REGION.WINDOW_SIZES", [256])
    mapper = TwoViewMapper(cfg, is_train=True)
    for seed in range(20):
        valid = mapper({"file_name": str(path)}, rng=seed)["windows"]["res4"]["valid"]
        assert valid.numel() == 0 or not valid.any()


def test_idle_but_possibly_intended_settings_warn(caplog):
    cases = {
        "RESIM.GLOBAL.LOSS_WEIGHT is 0": ["RESIM.GLOBAL.LOSS_WEIGHT", 0.0],
        "RESIM.REGION.LOSS_WEIGHTS for 'res4' is 0": ["RESIM.REGION.LOSS_WEIGHTS", [0.0]],
        "DATASETS.TEST is empty": ["DATASETS.TEST", ()],
    }
    for text, opts in cases.items():
        with caplog.at_level(logging.WARNING, logger="resim_d2"):
            caplog.clear()
            warnings = check_config(demo_cfg(*opts))
        assert any(text in w for w in warnings) and text in caplog.text, (text, warnings)


def test_windows_that_rarely_fit_warn_with_the_share_the_mapper_sees(tmp_path):
    opts = ["RESIM.REGION.WINDOW_SIZES", [120], "RESIM.REGION.WINDOW_STRIDES", [8]]
    opts += ["RESIM.VIEWS.SCALE", (0.05, 0.3)]
    cfg = demo_cfg(*opts)
    errors, warnings = config_problems(cfg)
    assert not errors and len(warnings) == 1
    assert "RESIM.REGION.WINDOW_SIZES 120" in warnings[0] and "fit in only" in warnings[0]
    claimed = float(warnings[0].split("fit in only ")[1].split("%")[0]) / 100
    # the share of view pairs with a window, measured by the mapper on a 4:3 image, other draws
    path = tmp_path / "photo.png"
    Image.fromarray(np.full((375, 500, 3), 128, np.uint8)).save(path)
    args = TwoViewMapper.from_config(cfg, is_train=True)
    mapper = TwoViewMapper(**{**args, "color_augment": None})  # colour draws nothing geometric
    rng = np.random.default_rng(123)
    hits = [
        bool(mapper({"file_name": str(path)}, rng=rng)["windows"]["res4"]["valid"].any())
        for _ in range(400)
    ]
    assert claimed < 0.05 and abs(np.mean(hits) - claimed) < 0.03


def test_fpn_transfer_without_fpn_is_an_error():
    cfg = add_resim_config(get_cfg())
    cfg.merge_from_file(get_config_file("finetune/voc_R50_C4_24k.yaml"))
    cfg.RESIM.FINETUNE.TRANSFER_FPN = True
    with pytest.raises(ConfigError, match="RESIM.FINETUNE.TRANSFER_FPN.*MODEL.BACKBONE.NAME"):
        check_config(cfg)


def test_train_net_stops_at_start_naming_the_keys(tmp_path):
    out = tmp_path / "run"
    run = train_net(*TINY, "OUTPUT_DIR", str(out), "RESIM.REGION.WINDOW_SIZES", "[256]")
    assert run.returncode != 0
    assert "ConfigError" in run.stderr and "RESIM.REGION.WINDOW_SIZES" in run.stderr
    assert "RESIM.VIEWS.SIZE 64" in run.stderr
    assert not glob.glob(str(out / "model_*.pth")) and not (out / "metrics.json").exists()


def test_a_level_the_backbone_does_not_produce_stops_the_build():
    from detectron2.modeling import build_model

    cfg = demo_cfg(*TINY, "RESIM.REGION.IN_FEATURES", ["res3"])  # the C4 trunk gives res4, res5
    assert config_problems(cfg) == ([], [])  # needs the built backbone: checked where it is built
    with pytest.raises(
        ValueError, match="RESIM.REGION.IN_FEATURES 'res3' is not a backbone output"
    ):
        build_model(cfg)
