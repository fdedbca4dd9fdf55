"""The ReSim region branch on tiny ResNet-18 encoders (CPU): negative groups checked against
gathering and the batch; ReSim-on-SimSiam's region MLPs and padded windows."""

import copy

import pytest
import torch
from helpers.resim_model import (
    build,
    make_batch,
    tiny_resim_cfg,
    total_loss,
)

import resim_d2  # noqa: F401  (compat + registers ReSim)
from resim_d2 import add_resim_config

from detectron2.config import get_cfg
from detectron2.modeling import build_model


def test_negative_groups_are_checked_against_gathering_and_the_batch():
    cfg = tiny_resim_cfg("fpn")
    cfg.RESIM.REGION.NEG_GROUP_IMAGES = [2, 2]  # p4 is gathered: one set, cannot be grouped
    with pytest.raises(ValueError, match="NEG_GROUP_IMAGES for 'p4' is 2"):
        build(cfg)
    cfg.RESIM.REGION.NEG_GROUP_IMAGES = [3, 0]
    cfg.RESIM.MOCO.QUEUE_SIZE = 36
    model = build(cfg)
    model.train()
    with pytest.raises(ValueError, match="NEG_GROUP_IMAGES for 'p3' is 3, but this process has 4"):
        model(make_batch(cfg, B=4, seed=1))
    assert torch.isfinite(total_loss(model(make_batch(cfg, B=3, seed=1))))  # B <= group: one set


def test_simsiam_region_mlps_have_table7_sizes_and_ignore_padding():
    from resim_d2 import get_config_file

    cfg = add_resim_config(get_cfg())
    cfg.merge_from_file(get_config_file("pretrain/resim_c4_simsiam_in100_500ep.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    mlp = model.region_mlps["res4"]
    # Table 7's C4 1024 -> 1024 -> 1024 read as the global 2048 -> 2048 -> 2048: in -> hidden ->
    # out, SimSiam's 3-layer projector depth for both; prediction 1024 -> 256 -> 1024, 2 layers
    sizes = [tuple(m.weight.shape[::-1]) for m in (*mlp.proj.fcs, mlp.proj.fc_out)]
    assert sizes == [(1024, 1024)] * 3
    sizes = [tuple(m.weight.shape[::-1]) for m in (*mlp.pred.fcs, mlp.pred.fc_out)]
    assert sizes == [(1024, 256), (256, 1024)]
    glob = [m for m in model.global_head.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape[::-1]) for m in glob] == [(2048, 2048)] * 3
    pred = [m for m in model.predictor.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape[::-1]) for m in pred] == [(2048, 512), (512, 2048)]
    assert isinstance(model.region_heads["res4"], torch.nn.Identity)

    # padded windows change nothing: the same loss with 5 more padded windows per image (with
    # unmasked batch norms their zero features would shift the statistics)
    cfg = tiny_resim_cfg("c4", framework="simsiam")
    model = build(cfg)
    model.train()
    batch = make_batch(cfg, B=3, seed=4)
    padded = copy.deepcopy(batch)
    for d in padded:
        w = d["windows"]["res4"]
        for key in ("boxes_q", "boxes_k"):
            boxes = torch.as_tensor(w[key])
            w[key] = torch.cat([boxes, torch.tensor([[8.0, 8.0, 40.0, 40.0]] * 5).to(boxes)])
        w["valid"] = torch.cat([torch.as_tensor(w["valid"]), torch.zeros(5, dtype=torch.bool)])
    losses = [model(b)["loss_region_res4"].detach() for b in (batch, padded)]
    assert losses[0] != 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_windows_that_are_rows_of_one_tensor_are_not_stacked_again():
    from resim_d2.modeling.region_branch import _rows_of_one_tensor

    whole = torch.rand(3, 2, 4)
    assert _rows_of_one_tensor([whole[0], whole[1], whole[2]]) is whole
    assert _rows_of_one_tensor([whole[1], whole[0], whole[2]]) is None  # not in row order
    assert _rows_of_one_tensor([whole[0], whole[1]]) is None  # not every row
    assert _rows_of_one_tensor([whole[0].clone(), whole[1], whole[2]]) is None  # a copy
    assert _rows_of_one_tensor([whole[:, 0][0], whole[1], whole[2]]) is None  # another view
