#!/usr/bin/env python
"""Train or evaluate with resim_d2: ReSim pre-training and transfer (VOC, COCO, Cityscapes,
DensePose, linear probe), one entry point.

    # pre-train (8 GPUs on one machine)
    CONFIG=configs/pretrain/resim_c4_moco_in1k_200ep.yaml   # or resim_fpn_moco_in1k_200ep.yaml
    python tools/train_net.py --num-gpus 8 --config-file $CONFIG
    # fine-tune and evaluate a detector from a converted checkpoint
    python tools/train_net.py --num-gpus 8 --config-file configs/finetune/voc_R50_C4_24k.yaml \
        MODEL.WEIGHTS output/resim_c4_d2.pkl
    python tools/train_net.py --eval-only --config-file ... MODEL.WEIGHTS model_final.pth

What differs between kinds of run (data, evaluators, checkpointer, hooks) comes from the config's
run kind (resim_d2.engine.build_run_kind); --eval-only loads weights with the kind's checkpointer,
so RESIM.FINETUNE.TRANSFER_FPN applies there too.
Multi-machine: add --num-machines N --machine-rank R --dist-url tcp://HOST:PORT, as in detectron2.
"""

import resim_d2  # noqa: F401  (first: adapts detectron2 to the installed libraries, registers ours)
from resim_d2.config import add_resim_config
from resim_d2.config_checks import check_config
from resim_d2.engine import Trainer, build_run_kind
from resim_d2.engine.reliability import setup_run_logging
from resim_d2.utils.projects import add_project_configs

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm


def load_config(args):
    """Config from file and command line, not frozen."""
    cfg = get_cfg()
    add_resim_config(cfg)
    add_project_configs(cfg, args.config_file)  # DensePose keys, or an error saying how to get them
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    return cfg


def setup(args):
    """The run's config (with the values its kind derives), frozen; output folder, logging and
    seed set up."""
    cfg = load_config(args)
    build_run_kind(cfg).prepare_config()
    cfg.freeze()
    default_setup(cfg, args)
    setup_run_logging(cfg)  # resim_d2's log lines into OUTPUT_DIR/log.txt too
    if not args.eval_only:
        check_config(cfg)  # settings that would leave a branch idle: error or warning
    build_run_kind(cfg).setup()
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        kind = build_run_kind(cfg)
        model = kind.build_model()
        kind.build_checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = kind.evaluate(model)
        if res and cfg.TEST.EXPECTED_RESULTS and comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # the final evaluation's results (DefaultTrainer evaluates after the last iteration)
    return getattr(trainer, "_last_eval_results", None)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        timeout=build_run_kind(load_config(args)).launch_timeout(),
    )
