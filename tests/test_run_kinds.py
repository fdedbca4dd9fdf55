"""The per-kind-of-run extension point: which kind a config gets, and that the Trainer builds
every piece (model, optimizer, scheduler, loaders, checkpointer, hooks, writers, evaluation)
through the kind rather than by itself."""

import os

import pytest
import torch

from resim_d2 import add_resim_config, get_config_file
from resim_d2.checkpoint import ResumableCheckpointer, TransferCheckpointer
from resim_d2.engine import RUN_KIND_REGISTRY, Trainer, build_run_kind, run_kind_name
from resim_d2.engine.finetuning import DetectorFinetuning

from detectron2.config import CfgNode, get_cfg
from detectron2.engine import HookBase
from detectron2.utils.events import EventWriter

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(name):
    cfg = add_resim_config(get_cfg())
    cfg.merge_from_file(get_config_file(name))
    return cfg


@pytest.mark.parametrize(
    "name, kind",
    [
        ("pretrain/demo_resim_c4_cpu.yaml", "ReSimPretraining"),
        ("pretrain/mocov2_in1k_200ep.yaml", "ReSimPretraining"),
        ("linear_probe/imagenet_R50_lincls.yaml", "LinearProbe"),
        ("finetune/voc_R50_C4_24k.yaml", "DetectorFinetuning"),
        ("finetune/coco_R50_FPN_1x.yaml", "DetectorFinetuning"),
        ("finetune/cityscapes_R50_FPN.yaml", "DetectorFinetuning"),
    ],
)
def test_each_config_gets_its_kind(name, kind):
    assert run_kind_name(_cfg(name)) == kind
    assert type(build_run_kind(_cfg(name))).__name__ == kind


def test_densepose_configs_get_the_densepose_kind():
    cfg = _cfg("finetune/coco_R50_FPN_1x.yaml")
    cfg.MODEL.DENSEPOSE_ON = True  # the key the DensePose project's configs add (True there)
    assert run_kind_name(cfg) == "DensePoseRCNN"


def test_checkpointers_by_kind():
    model = torch.nn.Linear(2, 2)
    pre = build_run_kind(_cfg("pretrain/demo_resim_c4_cpu.yaml")).build_checkpointer(model)
    # pre-training resumes its own checkpoints (atomic saves), with no transfer rules
    assert type(pre) is ResumableCheckpointer
    fpn_t = _cfg("finetune/coco_R50_FPN_1x_fpnT.yaml")
    ckpt = build_run_kind(fpn_t).build_checkpointer(model)
    assert isinstance(ckpt, TransferCheckpointer) and ckpt.transfer_fpn


class _Marker(HookBase):
    pass


class _Writer(EventWriter):
    def write(self):
        pass


@pytest.fixture
def recording_kind(monkeypatch):
    """A kind registered for the test that records what the Trainer asked it for."""
    calls = []

    class RecordingKind(DetectorFinetuning):
        def __getattribute__(self, name):
            if name.startswith("build_") or name in ("resumed_train_loader", "test"):
                calls.append(name)
            return super().__getattribute__(name)

        def build_optimizer(self, model):
            self.optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            return self.optimizer

        def build_hooks(self, trainer, hooks):
            return hooks + [_Marker()]

        def build_writers(self, writers):
            return writers + [_Writer()]

    RUN_KIND_REGISTRY.register(RecordingKind)
    monkeypatch.setattr("resim_d2.engine.run_kind.run_kind_name", lambda cfg: "RecordingKind")
    yield calls
    RUN_KIND_REGISTRY._obj_map.pop("RecordingKind")


def test_trainer_builds_every_piece_through_the_kind(recording_kind, synthetic_voc, tmp_path):
    cfg = _cfg("finetune/demo_synthetic_voc_R18_C4.yaml")
    cfg.merge_from_list(
        ["DATASETS.TRAIN", (synthetic_voc[0],), "DATASETS.TEST", (synthetic_voc[1],)]
    )
    cfg.merge_from_list(["SOLVER.MAX_ITER", 1, "OUTPUT_DIR", str(tmp_path), "SEED", 0])
    cfg.RESIM.EVALUATOR = "pascal_voc"
    cfg.merge_from_list(["INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MIN_SIZE_TEST", 64])
    trainer = Trainer(cfg)
    for piece in ("model", "optimizer", "train_loader", "step_trainer", "lr_scheduler"):
        assert f"build_{piece}" in recording_kind, piece
    assert "build_checkpointer" in recording_kind and "build_hooks" in recording_kind
    assert trainer.optimizer is trainer.kind.optimizer
    assert isinstance(trainer.checkpointer, TransferCheckpointer)
    assert isinstance(trainer._hooks[-1], _Marker)
    writer_hook = [h for h in trainer._hooks if hasattr(h, "_writers")][0]
    assert isinstance(writer_hook._writers[-1], _Writer)
    # the periodic checkpointer saves through the kind's checkpointer
    saver = [h for h in trainer._hooks if hasattr(h, "checkpointer")][0]
    assert saver.checkpointer is trainer.checkpointer
    trainer.resume_or_load(resume=False)
    assert "resumed_train_loader" in recording_kind
    del recording_kind[:]
    trainer.train()  # trains 1 iteration, then the final evaluation asks the kind
    assert {"test", "build_test_loader", "build_evaluator"} <= set(recording_kind)
    assert "bbox" in trainer._last_eval_results
    assert os.path.isfile(tmp_path / "model_final.pth")


def test_run_kind_has_detectron2_defaults():
    cfg = _cfg("finetune/voc_R50_C4_24k.yaml")
    kind = build_run_kind(cfg)
    assert isinstance(kind.cfg, CfgNode) and kind.launch_timeout().total_seconds() > 0
    assert kind.build_hooks(None, ["a"]) == ["a"] and kind.build_writers(["w"]) == ["w"]
    assert kind.resumed_train_loader(5, 0) is None
