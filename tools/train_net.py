#!/usr/bin/env python
"""Train or evaluate with resim_d2: ReSim pre-training and detectron2 fine-tuning, one entry point.

    # pre-train (8 GPUs on one machine)
    python tools/train_net.py --num-gpus 8 --config-file configs/pretrain/resim_c4_in1k_200ep.yaml
    # fine-tune and evaluate a detector from a converted checkpoint
    python tools/train_net.py --num-gpus 8 --config-file configs/finetune/voc_R50_C4_24k.yaml \
        MODEL.WEIGHTS output/resim_c4_d2.pkl
    python tools/train_net.py --eval-only --config-file ... MODEL.WEIGHTS model_final.pth

Multi-machine: add --num-machines N --machine-rank R --dist-url tcp://HOST:PORT, as in detectron2.
"""

import resim_d2  # noqa: F401  (first: adapts detectron2 to the installed libraries, registers ours)
from resim_d2.checkpoint import build_checkpointer
from resim_d2.config import add_resim_config
from resim_d2.config_checks import check_config
from resim_d2.engine import Trainer, is_pretraining, resolve_pretrain_schedule
from resim_d2.engine.reliability import setup_run_logging
from resim_d2.utils.projects import add_project_configs

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results


def setup(args):
    """Config from file and command line, frozen; output folder, logging and seed set up."""
    cfg = get_cfg()
    add_resim_config(cfg)
    add_project_configs(cfg, args.config_file)  # DensePose keys, or an error saying how to get them
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if is_pretraining(cfg):
        resolve_pretrain_schedule(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_run_logging(cfg)  # resim_d2's log lines into OUTPUT_DIR/log.txt too
    if not args.eval_only:
        check_config(cfg)  # settings that would leave a branch idle: error or warning
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if res and cfg.TEST.EXPECTED_RESULTS:
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
    )
