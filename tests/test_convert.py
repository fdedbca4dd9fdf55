"""tools/convert.py and resim_d2.checkpoint: converted weights reproduce the source network.

References are independent of the converter: the pre-training encoder itself (our checkpoints),
torchvision's ResNet (MoCo-family and torchvision layouts), and the released ReSim FPN forward
written out with plain convolutions (released layout).
"""

import glob
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision

import resim_d2  # noqa: F401  (compat + registrations)
from resim_d2 import add_resim_config, get_config_file
from resim_d2.checkpoint import (
    TransferCheckpointer,
    convert_checkpoint,
    detect_layout,
    load_checkpoint,
    reconcile,
    save_conversion,
)
from resim_d2.modeling import backbone_features
from resim_d2.utils.projects import required_projects

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = sorted(glob.glob(os.path.join(REPO, "configs", "finetune", "*.yaml")))


def tiny_resnet(cfg, depth):
    """18: ResNet-18; "50t": a narrow ResNet-50 (bottleneck blocks, 16-256 channels)."""
    rn = cfg.MODEL.RESNETS
    if depth == 18:
        rn.DEPTH, rn.RES2_OUT_CHANNELS = 18, 64
    else:
        rn.DEPTH, rn.STEM_OUT_CHANNELS, rn.RES2_OUT_CHANNELS, rn.WIDTH_PER_GROUP = 50, 16, 32, 8
    if "fpn" in cfg.MODEL.BACKBONE.NAME:
        cfg.MODEL.FPN.OUT_CHANNELS = 32
    return cfg


def pretrain_model(arch, depth=18, seed=0, config=None):
    """A tiny ReSim model from configs/pretrain, every backbone weight and BN statistic random."""
    cfg = get_cfg()
    add_resim_config(cfg)
    config = config or f"pretrain/Base-ReSim-{'C4' if arch == 'c4' else 'FPN'}.yaml"
    cfg.merge_from_file(get_config_file(config))
    cfg.MODEL.DEVICE = "cpu"
    tiny_resnet(cfg, depth)
    cfg.RESIM.MOCO.MLP_DIM, cfg.RESIM.MOCO.DIM, cfg.RESIM.MOCO.QUEUE_SIZE = 32, 16, 32
    cfg.RESIM.REGION.HEAD_DIM = 16
    cfg.SOLVER.IMS_PER_BATCH = 4
    torch.manual_seed(seed)
    model = build_model(cfg)
    randomize(model.backbone)
    return model.eval()


@torch.no_grad()
def randomize(module):
    """Random BN statistics/affine and conv biases, so a misplaced tensor changes the output."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
        elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            m.bias.normal_(0, 0.2)
    return module


def finetune_cfg(name, depth=18, opts=()):
    cfg = get_cfg()
    add_resim_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "finetune", name))
    cfg.MODEL.DEVICE = "cpu"
    tiny_resnet(cfg, depth)
    cfg.merge_from_list(list(opts))
    return cfg


def load(model, path, transfer_fpn=False):
    """Load ``path`` as detectron2 does for MODEL.WEIGHTS; returns the incompatible keys."""
    ckpt = TransferCheckpointer(model, transfer_fpn=transfer_fpn)
    return ckpt._load_model(ckpt._load_file(path))


def convert_file(tmp_path, obj, name, **kwargs):
    src = tmp_path / f"{name}_src.pth"
    torch.save(obj, src)
    conv = convert_checkpoint(load_checkpoint(str(src)), source=str(src), **kwargs)
    return conv, str(tmp_path / f"{name}_d2.pth")


def c4_features(det, x):
    res4 = det.backbone(x)["res4"]
    return res4, det.roi_heads.res5[:-1](res4)  # res5 blocks without the extra norm


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ------------------------------------------------------------------------ our pre-training
@torch.no_grad()
def test_resim_c4_checkpoint_gives_the_encoder_c4_c5(tmp_path):
    pre = pretrain_model("c4")
    conv, out = convert_file(tmp_path, {"model": pre.state_dict(), "iteration": 9}, "c4")
    assert conv.layout == "resim_d2"
    assert any(d.startswith("roi_heads.res5.0.") for _, d in conv.moved)
    assert not any(d.startswith(("backbone.res5", "backbone_k")) for d in conv.model)
    reasons = {r for _, r in conv.dropped}
    assert any("key encoder" in r for r in reasons) and any("queue" in r for r in reasons)

    det = build_model(finetune_cfg("voc_R50_C4_24k.yaml")).eval()
    rec = reconcile(conv, det.state_dict())
    save_conversion(conv, out)
    inc = load(det, out)
    assert not inc.unexpected_keys and not inc.incorrect_shapes
    assert sorted(inc.missing_keys) == sorted(rec.random_init)
    assert all(not k.startswith("backbone.") for k in inc.missing_keys)

    ref = pre.backbone(X)
    res4, res5 = c4_features(det, X)
    torch.testing.assert_close(res4, ref["res4"], rtol=0, atol=1e-5)
    torch.testing.assert_close(res5, ref["res5"], rtol=0, atol=1e-5)


@torch.no_grad()
def test_resim_simsiam_checkpoint_drops_its_region_mlps(tmp_path):
    pre = pretrain_model("c4", config="pretrain/resim_c4_simsiam_in100_500ep.yaml")
    assert any(k.startswith("region_mlps.") for k in pre.state_dict())
    conv, out = convert_file(tmp_path, {"model": pre.state_dict()}, "simsiam")
    assert conv.layout == "resim_d2"
    mlps = {k for k in pre.state_dict() if k.startswith("region_mlps.")}
    dropped = dict(conv.dropped)
    assert mlps <= set(dropped)
    assert {dropped[k] for k in mlps if not k.endswith("num_batches_tracked")} == {
        "pre-training heads"
    }
    det = build_model(finetune_cfg("voc_R50_C4_24k.yaml")).eval()
    save_conversion(conv, out)
    inc = load(det, out)
    assert not inc.unexpected_keys and not inc.incorrect_shapes
    torch.testing.assert_close(c4_features(det, X)[0], pre.backbone(X)["res4"], rtol=0, atol=1e-5)


@torch.no_grad()
def test_resim_fpn_checkpoint_gives_p3_p4_with_fpn_transfer(tmp_path):
    pre = pretrain_model("fpn")
    conv, out = convert_file(
        tmp_path, {"model": pre.state_dict()}, "fpn", target="fpn", transfer_fpn=True
    )
    # FPN^T: laterals 3-5 and outputs 3-4 trained on p3/p4; p2 convs and output5 were not
    fpn = {d.split(".")[1] for d in conv.model if d.startswith("backbone.fpn_")}
    assert fpn == {"fpn_lateral3", "fpn_lateral4", "fpn_lateral5", "fpn_output3", "fpn_output4"}

    # detector FPN without norms, so the pre-trained convs (with their biases) are the whole FPN
    cfg = finetune_cfg("coco_R50_FPN_1x_fpnT.yaml", opts=["MODEL.FPN.NORM", ""])
    det = build_model(cfg).eval()
    reconcile(conv, det.state_dict())
    save_conversion(conv, out)
    inc = load(det, out, transfer_fpn=cfg.RESIM.FINETUNE.TRANSFER_FPN)
    assert not inc.unexpected_keys and not inc.incorrect_shapes
    assert not [k for k in inc.missing_keys if k.startswith("backbone.bottom_up.")]

    ref = backbone_features(pre.backbone, X, ["p3", "p4"])
    got, bottom_up = det.backbone(X), det.backbone.bottom_up(X)
    for name in ("res4", "res5"):
        torch.testing.assert_close(bottom_up[name], ref[name], rtol=0, atol=1e-5)
    for name in ("p3", "p4"):
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5)


@torch.no_grad()
def test_fpn_checkpoint_to_c4_detector_and_fpn_weights_need_the_fpn_target(tmp_path):
    pre = pretrain_model("fpn")
    conv, _ = convert_file(tmp_path, {"model": pre.state_dict()}, "fpn_c4", target="c4")
    assert not any("fpn" in d for d in conv.model)
    assert any("C4 detector has no FPN" in r for _, r in conv.dropped)
    det = build_model(finetune_cfg("voc_R50_C4_24k.yaml")).eval()
    reconcile(conv, det.state_dict())
    det.load_state_dict(conv.model, strict=False)
    ref = pre.backbone.bottom_up(X)
    res4, res5 = c4_features(det, X)
    torch.testing.assert_close(res5, ref["res5"], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="FPN target"):
        convert_checkpoint({"model": pre.state_dict()}, target="c4", transfer_fpn=True)


# ---------------------------------------------------------- MoCo-family and torchvision layouts
def torchvision_resnet(kind):
    torch.manual_seed(3)
    if kind == "r18":
        net = torchvision.models.resnet18(num_classes=10)
    else:  # a narrow ResNet-50: torchvision Bottleneck with width 16 per group
        net = torchvision.models.ResNet(
            torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], num_classes=10, width_per_group=16
        )
    return randomize(net).eval()


def torchvision_stages(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = {}
    for i in range(1, 5):
        x = getattr(net, f"layer{i}")(x)
        out[f"res{i + 1}"] = x
    return out


def moco_checkpoint(sd):
    state = {f"module.encoder_q.{k}": v for k, v in sd.items()}
    state.update({f"module.encoder_k.{k}": v.clone() for k, v in sd.items()})
    state["module.queue"] = torch.randn(16, 8)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}}}


@pytest.mark.parametrize("layout", ["torchvision", "moco"])
@pytest.mark.parametrize("kind", ["r18", "r50"])
@torch.no_grad()
def test_moco_and_torchvision_layouts_give_torchvision_features(tmp_path, layout, kind):
    net = torchvision_resnet(kind)
    sd = net.state_dict()
    obj = sd if layout == "torchvision" else moco_checkpoint(sd)
    ref = torchvision_stages(net, X)
    depth_opts = (
        []
        if kind == "r18"
        else ["MODEL.RESNETS.STEM_OUT_CHANNELS", 64, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256]
        + ["MODEL.RESNETS.WIDTH_PER_GROUP", 16]
    )
    depth = 18 if kind == "r18" else "50t"
    for target, config in (("c4", "voc_R50_C4_24k.yaml"), ("fpn", "coco_R50_FPN_1x.yaml")):
        conv, out = convert_file(tmp_path, obj, f"{layout}_{kind}_{target}", target=target)
        assert conv.layout == layout
        assert any("fc" in r for _, r in conv.dropped)
        det = build_model(finetune_cfg(config, depth, depth_opts)).eval()
        reconcile(conv, det.state_dict())
        save_conversion(conv, out)
        inc = load(det, out)
        assert not inc.unexpected_keys and not inc.incorrect_shapes
        if target == "c4":
            res4, res5 = c4_features(det, X)
            got = {"res4": res4, "res5": res5}
        else:
            got = det.backbone.bottom_up(X)
            torch.testing.assert_close(got["res2"], ref["res2"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["res4"], ref["res4"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["res5"], ref["res5"], rtol=0, atol=1e-5)


def released_fpn_convs(ch, out=32, norm=False, seed=4):
    """FPN tensors as the released ReSim encoder names them (moco/models.py, use_fpn_norm)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for lvl, cin in zip((5, 4, 3), ch):
        for kind, shape in (("lateral", (out, cin, 1, 1)), ("output", (out, out, 3, 3))):
            if kind == "output" and lvl == 5:
                continue  # no output conv on C5 in the released code
            name = f"fpn_{kind}{lvl}"
            w = torch.randn(shape, generator=g) * 0.1
            if norm:
                sd[f"{name}.0.weight"] = w
                sd[f"{name}.1.weight"] = torch.rand(out, generator=g) + 0.5
                sd[f"{name}.1.bias"] = torch.randn(out, generator=g) * 0.1
                sd[f"{name}.1.running_mean"] = torch.randn(out, generator=g) * 0.1
                sd[f"{name}.1.running_var"] = torch.rand(out, generator=g) + 0.5
                sd[f"{name}.1.num_batches_tracked"] = torch.tensor(7)
            else:
                sd[f"{name}.weight"] = w
                sd[f"{name}.bias"] = torch.randn(out, generator=g) * 0.1
    return sd


def released_fpn_forward(sd, c3, c4, c5, norm=False):
    """P4, P3 of the released ReSim encoder (moco/models.py _forward_impl), written out."""

    def conv(name, x, pad):
        if not norm:
            return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=pad)
        y = F.conv2d(x, sd[f"{name}.0.weight"], padding=pad)
        return F.batch_norm(
            y, sd[f"{name}.1.running_mean"], sd[f"{name}.1.running_var"],
            sd[f"{name}.1.weight"], sd[f"{name}.1.bias"], False, 0.0, 1e-5,
        )  # fmt: skip

    prev = conv("fpn_lateral5", c5, 0)
    prev = conv("fpn_lateral4", c4, 0) + F.interpolate(prev, scale_factor=2.0, mode="nearest")
    p4 = conv("fpn_output4", prev, 1)
    prev = conv("fpn_lateral3", c3, 0) + F.interpolate(prev, scale_factor=2.0, mode="nearest")
    return p4, conv("fpn_output3", prev, 1)


@pytest.mark.parametrize("norm", [False, True])
@torch.no_grad()
def test_released_resim_fpn_layout_gives_released_p3_p4(tmp_path, norm):
    net = torchvision_resnet("r18")
    sd = dict(net.state_dict())
    fpn = released_fpn_convs((512, 256, 128), norm=norm)
    sd.update(fpn)
    conv, out = convert_file(
        tmp_path, moco_checkpoint(sd), f"released_{norm}", target="fpn", transfer_fpn=True
    )
    assert conv.layout == "moco"
    assert ("backbone.fpn_lateral5.norm.weight" in conv.model) == norm
    cfg = finetune_cfg("coco_R50_FPN_1x_fpnT.yaml", opts=["MODEL.FPN.NORM", "BN" if norm else ""])
    det = build_model(cfg).eval()
    reconcile(conv, det.state_dict())
    save_conversion(conv, out)
    inc = load(det, out, transfer_fpn=True)
    assert not inc.unexpected_keys and not inc.incorrect_shapes
    ref = torchvision_stages(net, X)
    p4, p3 = released_fpn_forward(fpn, ref["res3"], ref["res4"], ref["res5"], norm=norm)
    got = det.backbone(X)
    torch.testing.assert_close(got["p4"], p4, rtol=0, atol=1e-5)
    torch.testing.assert_close(got["p3"], p3, rtol=0, atol=1e-5)


@torch.no_grad()
def test_moco_style_detectron2_file_with_numpy_arrays(tmp_path):
    """What MoCo's/ReSim's convert-pretrain-to-detectron2.py write: NumPy arrays, d2 names."""
    pre = pretrain_model("c4")
    model = {
        k[len("backbone.") :]: v.numpy()
        for k, v in pre.state_dict().items()
        if k.startswith("backbone.") and "num_batches" not in k
    }
    path = tmp_path / "moco_d2.pth"
    torch.save({"model": model, "__author__": "MOCO", "matching_heuristics": True}, path)
    conv = convert_checkpoint(load_checkpoint(str(path)), target="c4")
    assert conv.layout == "d2_backbone"
    det = build_model(finetune_cfg("voc_R50_C4_24k.yaml")).eval()
    reconcile(conv, det.state_dict())
    det.load_state_dict(conv.model, strict=False)
    torch.testing.assert_close(c4_features(det, X)[1], pre.backbone(X)["res5"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------- every fine-tuning config
@pytest.fixture(scope="module")
def tiny_r50_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for arch in ("c4", "fpn"):
        path = root / f"pre_{arch}.pth"
        torch.save({"model": pretrain_model(arch, "50t").state_dict()}, path)
        out[arch] = load_checkpoint(str(path))
    return out


@pytest.mark.parametrize("config", [os.path.basename(p) for p in FINETUNE])
def test_every_finetune_config_loads_converted_weights_with_no_backbone_key_missing(
    tmp_path, tiny_r50_checkpoints, config
):
    if required_projects(os.path.join(REPO, "configs", "finetune", config)):
        pytest.skip("needs detectron2's DensePose project (tested in test_finetune_configs.py)")
    cfg = finetune_cfg(config, "50t")
    target = "fpn" if "fpn" in cfg.MODEL.BACKBONE.NAME else "c4"
    transfer = cfg.RESIM.FINETUNE.TRANSFER_FPN
    conv = convert_checkpoint(tiny_r50_checkpoints[target], target=target, transfer_fpn=transfer)
    det = build_model(cfg)
    reconcile(conv, det.state_dict())
    out = save_conversion(conv, str(tmp_path / "w.pth"))
    inc = load(det, out, transfer_fpn=transfer)
    assert not inc.unexpected_keys and not inc.incorrect_shapes
    backbone = [
        k
        for k in inc.missing_keys
        if k.startswith(("backbone.bottom_up.", "backbone.stem", "backbone.res"))
        or (k.startswith("roi_heads.res5.") and not k.startswith("roi_heads.res5.norm"))
    ]
    assert backbone == []
    if transfer:  # FPN^T: every conv pre-training trained is loaded (their new norms are not)
        for conv_name in ("lateral3", "lateral4", "lateral5", "output3", "output4"):
            assert f"backbone.fpn_{conv_name}.weight" not in inc.missing_keys


def test_transfer_checkpointer_follows_transfer_fpn(tmp_path):
    pre = pretrain_model("fpn")
    ckpt = {"model": pre.state_dict()}
    t_conv = convert_checkpoint(ckpt, target="fpn", transfer_fpn=True)
    r_conv = convert_checkpoint(ckpt, target="fpn", transfer_fpn=False)
    with_fpn = save_conversion(t_conv, str(tmp_path / "t.pth"))
    resnet_only = save_conversion(r_conv, str(tmp_path / "r.pth"))
    det = build_model(finetune_cfg("coco_R50_FPN_1x.yaml"))
    data = TransferCheckpointer(det, transfer_fpn=False)._load_file(with_fpn)
    assert not any(k.startswith("backbone.fpn_") for k in data["model"])
    with pytest.raises(ValueError, match="--fpn"):
        TransferCheckpointer(det, transfer_fpn=True)._load_file(resnet_only)
    # a plain detectron2 checkpoint (e.g. --resume) is loaded as is
    torch.save({"model": det.state_dict()}, tmp_path / "plain.pth")
    data = TransferCheckpointer(det, transfer_fpn=False)._load_file(str(tmp_path / "plain.pth"))
    assert any(k.startswith("backbone.fpn_") for k in data["model"])


def test_pkl_output_loads_in_detectron2(tmp_path):
    pre = pretrain_model("c4")
    conv = convert_checkpoint({"model": pre.state_dict()}, target="c4")
    path = save_conversion(conv, str(tmp_path / "w.pkl"))
    with open(path, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "resim_d2" and data["matching_heuristics"] is False
    det = build_model(finetune_cfg("voc_R50_C4_24k.yaml"))
    DetectionCheckpointer(det).load(path)
    key = "roi_heads.res5.1.conv2.weight"
    torch.testing.assert_close(
        det.state_dict()[key], pre.state_dict()["backbone.res5.1.conv2.weight"]
    )


# -------------------------------------------------------------------------------- failures
def test_unknown_layout_says_what_it_expected():
    flat = {"encoder.block1.conv.weight": torch.zeros(1), "head.fc.bias": torch.zeros(1)}
    obj = {"weights": flat, "epoch": 3}
    for bad in (obj, flat):
        with pytest.raises(ValueError) as e:
            detect_layout(bad)
        msg = str(e.value)
        for expected in ("resim_d2", "moco", "module.encoder_q", "torchvision", "layer1.0.conv1"):
            assert expected in msg
    with pytest.raises(ValueError, match="encoder.block1.conv.weight"):
        detect_layout(flat)


class _Payload:
    pass


def test_checkpoints_load_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "obj": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(str(path))


# --------------------------------------------------------------------------------------- CLI
def test_cli_reports_moved_dropped_and_random_init(tmp_path, capsys, load_tool):
    cli = load_tool("convert")
    src = tmp_path / "model_final.pth"
    torch.save({"model": pretrain_model("c4").state_dict(), "iteration": 5}, src)
    out = tmp_path / "d2.pth"
    cli.main([str(src), str(out)])  # default check config with the checkpoint's ResNet-18
    text = capsys.readouterr().out
    assert "layout: resim_d2" in text and "ResNet-18" in text
    assert "backbone.res5.* -> roi_heads.res5.*" in text
    assert "key encoder" in text and "roi_heads.res5.norm" in text
    assert "proposal_generator.rpn_head" in text
    data = torch.load(out, weights_only=True)
    assert data["__author__"] == "resim_d2" and data["resim_d2_conversion"]["target"] == "c4"


@pytest.mark.parametrize("content", [b"a text file, not a checkpoint\n", b""])
def test_cli_on_a_file_that_is_no_checkpoint_names_it(tmp_path, monkeypatch, capsys, content):
    """The command's own __main__ block: a one-line error naming the file, and none of torch's
    advice to load it with weights_only=False."""
    import runpy

    src = tmp_path / "notes.pth"
    src.write_bytes(content)
    tool = os.path.join(REPO, "tools", "convert.py")
    monkeypatch.setattr("sys.argv", [tool, str(src), str(tmp_path / "out.pth")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(tool, run_name="__main__")
    message = str(e.value.code)
    assert message.startswith(f"error: {src}: not a readable torch checkpoint"), message
    assert "weights_only" not in message and "Unsupported operand" not in message
    assert "\n" not in message and not (tmp_path / "out.pth").exists()
