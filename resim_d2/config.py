"""Config keys that resim_d2 adds to detectron2's defaults, and where its config files live."""

import os

from detectron2.config import CfgNode as CN

_CONFIG_ROOTS = (
    # a source checkout: <repo>/configs
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"),
    # an installed package: resim_d2/configs (package data)
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"),
)


def get_config_file(name: str) -> str:
    """Path of a config shipped with resim_d2, e.g. ``get_config_file("pretrain/demo.yaml")``."""
    for root in _CONFIG_ROOTS:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no config '{name}' under {' or '.join(_CONFIG_ROOTS)}")


def add_resim_config(cfg):
    """Add every resim_d2 key to a detectron2 config, in place, with its default. Returns cfg."""
    _C = cfg
    _C.RESIM = CN()
    # Evaluator built by tools/train_net.py; "" lets the test dataset's metadata evaluator_type
    # decide.
    _C.RESIM.EVALUATOR = ""

    # ---------------------------------------------------------------- two views (paper §3.3)
    _C.RESIM.VIEWS = CN()
    # Side of each square view, pixels.
    _C.RESIM.VIEWS.SIZE = 224
    # RandomResizedCrop area fraction range of the (flipped) original image.
    _C.RESIM.VIEWS.SCALE = (0.2, 1.0)
    # RandomResizedCrop aspect-ratio (w/h) range, sampled log-uniformly.
    _C.RESIM.VIEWS.RATIO = (3.0 / 4.0, 4.0 / 3.0)
    # Probability that the image (hence both views) is flipped horizontally; one draw per image.
    _C.RESIM.VIEWS.FLIP_PROB = 0.5
    # MoCo-v2 colour jitter strengths: brightness, contrast, saturation, hue.
    _C.RESIM.VIEWS.COLOR_JITTER = (0.4, 0.4, 0.4, 0.1)
    # Probability of applying the colour jitter to a view.
    _C.RESIM.VIEWS.COLOR_JITTER_PROB = 0.8
    # Probability of converting a view to grayscale (kept 3-channel).
    _C.RESIM.VIEWS.GRAYSCALE_PROB = 0.2
    # Gaussian-blur sigma range, pixels of the view.
    _C.RESIM.VIEWS.BLUR_SIGMA = (0.1, 2.0)
    # Probability of blurring a view.
    _C.RESIM.VIEWS.BLUR_PROB = 0.5
    # Window placement: "grid" (anchored at the query view's origin, as the released code) or
    # "overlap" (slid over the query/key overlap box, the paper's wording).
    _C.RESIM.VIEWS.WINDOW_PLACEMENT = "grid"
    # Unusable records in a row (per dataloader worker) that stop the run: the dataset is
    # unreadable.
    _C.RESIM.VIEWS.MAX_CONSECUTIVE_SKIPS = 100
    # Where the views are made: "cpu" (dataloader workers, the reference) or "gpu" (batched on
    # device).
    _C.RESIM.VIEWS.BACKEND = "cpu"

    # ---------------------------------------------------------------- region branch (§3.3-3.4, A.1)
    _C.RESIM.REGION = CN()
    # Whether the region branch exists; False gives the MoCo-v2 / SimSiam baselines.
    _C.RESIM.REGION.ENABLED = True
    # Feature maps the region loss uses: ["res4"] for ReSim-C4, ["p3", "p4"] for ReSim-FPN.
    _C.RESIM.REGION.IN_FEATURES = ["res4"]
    # Sliding-window side per feature, in view pixels (C4/P4 48, P3 32).
    _C.RESIM.REGION.WINDOW_SIZES = [48]
    # Sliding-window stride per feature, in view pixels (C4/P4 32, P3 24).
    _C.RESIM.REGION.WINDOW_STRIDES = [32]
    # Region-loss weight per feature.
    _C.RESIM.REGION.LOSS_WEIGHTS = [1.0]
    # Average-pool kernel that turns key maps into negatives, per feature (3 = 48/16 on C4/P4).
    _C.RESIM.REGION.NEG_POOL_KERNELS = [3]
    # Whether negatives of a feature are gathered from all GPUs (released code: C4/P4 yes, P3 no).
    _C.RESIM.REGION.GATHER_NEGATIVES = [True]
    # Images whose negatives form one set, per feature; 0 = all images of the process (or of all
    # GPUs when gathered); -1 = RESIM.BN_GROUP_IMAGES (the emulated GPU's images). The released
    # code keeps P3 negatives per GPU at 32 images per GPU; 32 here gives that same set whatever
    # the number of GPUs and the per-GPU batch (which must then be a multiple of it, or at most
    # it). Needs GATHER_NEGATIVES False for that feature.
    _C.RESIM.REGION.NEG_GROUP_IMAGES = [0]
    # Region feature extractor: "PrRoIPool" (paper) or "ROIAlign" (ablation, §4.1).
    _C.RESIM.REGION.POOLER_TYPE = "PrRoIPool"
    # Region projection: "conv" (two 3x3 convs, BN+ReLU after the first; paper) or "none" (raw maps,
    # released code).
    _C.RESIM.REGION.HEAD = "conv"
    # Output channels of the region projection.
    _C.RESIM.REGION.HEAD_DIM = 128
    # InfoNCE temperature of the region loss.
    _C.RESIM.REGION.TEMPERATURE = 0.2

    # ---------------------------------------------------------------- global branch
    _C.RESIM.GLOBAL = CN()
    # Instance-discrimination framework: "moco" (MoCo-v2) or "simsiam".
    _C.RESIM.GLOBAL.FRAMEWORK = "moco"
    # Weight λ of the global loss in the total loss.
    _C.RESIM.GLOBAL.LOSS_WEIGHT = 1.0
    # Feature the global branch pools (C5).
    _C.RESIM.GLOBAL.IN_FEATURE = "res5"

    _C.RESIM.MOCO = CN()
    # Hidden width of the MoCo-v2 projection MLP.
    _C.RESIM.MOCO.MLP_DIM = 2048
    # Output width of the projection MLP.
    _C.RESIM.MOCO.DIM = 128
    # Negative queue length (65,536 for IN-1K, 16,384 for IN-100).
    _C.RESIM.MOCO.QUEUE_SIZE = 65536
    # Key-encoder momentum.
    _C.RESIM.MOCO.MOMENTUM = 0.999
    # InfoNCE temperature of the global loss.
    _C.RESIM.MOCO.TEMPERATURE = 0.2
    # Batch-norm decorrelation of keys across GPUs: "shuffle" (MoCo's shuffle-BN) or "sync".
    _C.RESIM.MOCO.BN = "shuffle"

    # MoCo: every plain batch norm (MODEL.RESNETS.NORM "BN") of both encoders and the region heads
    # normalises each group of this many images of a process separately, as that many GPUs would
    # (the paper: 32 per GPU), and shuffle-BN shuffles the keys across the groups; so 1 GPU x 256,
    # 2 x 128 and 8 x 32 train the same model. The per-process batch must be a multiple of it, or
    # at most it (one group). 0: one group per process. SimSiam ignores it (whole-batch norms).
    _C.RESIM.BN_GROUP_IMAGES = 32

    _C.RESIM.SIMSIAM = CN()
    # Projection MLP width (all its layers this wide; paper Table 7 / SimSiam).
    _C.RESIM.SIMSIAM.PROJ_DIM = 2048
    # Linear layers of every SimSiam projection, global and region. Table 7 lists input -> hidden
    # -> output widths (C5 2048 -> 2048 -> 2048, C4 1024 -> 1024 -> 1024) and defers the depth to
    # SimSiam, whose projector has 3 (its predictor, 2048 -> 512 -> 2048, has 2): one reading for
    # every row.
    _C.RESIM.SIMSIAM.PROJ_LAYERS = 3
    # Keep the predictors (global and region) at the initial learning rate while the rest follows
    # the schedule: SimSiam's --fix-pred-lr, its recommended setting (on in the SimSiam configs).
    _C.RESIM.SIMSIAM.FIX_PRED_LR = False
    # Prediction MLP bottleneck width.
    _C.RESIM.SIMSIAM.PRED_HIDDEN_DIM = 512
    # Region objective of ReSim on SimSiam: "cosine" (SimSiam's symmetric negative cosine per window
    # pair, with Table 7's per-level MLPs on the pooled windows: projection C -> C -> C, prediction
    # C -> C*REGION_PRED_RATIO -> C) or "infonce" (the MoCo variant's region InfoNCE with in-batch
    # negatives from the same encoder's key view).
    _C.RESIM.SIMSIAM.REGION_LOSS = "cosine"
    # Bottleneck of the region prediction MLP as a fraction of the level's channels (Table 7: 1/4).
    _C.RESIM.SIMSIAM.REGION_PRED_RATIO = 0.25

    # ---------------------------------------------------------------- pre-training schedule
    _C.RESIM.SCHEDULE = CN()
    # Epochs over DATASETS.TRAIN; > 0 sets SOLVER.MAX_ITER = ceil(EPOCHS * images / IMS_PER_BATCH).
    _C.RESIM.SCHEDULE.EPOCHS = 0
    # Learning rate per 256 images; > 0 sets SOLVER.BASE_LR = LR_PER_256 * IMS_PER_BATCH / 256.
    _C.RESIM.SCHEDULE.LR_PER_256 = 0.0

    # ---------------------------------------------------------------- feature-quality evaluation
    _C.RESIM.EVAL = CN()
    # Images per inference batch of the region-correspondence evaluation (DATASETS.TEST).
    _C.RESIM.EVAL.IMS_PER_BATCH = 16
    # View pairs whose key windows compete as candidates for each query window.
    _C.RESIM.EVAL.GROUP_SIZE = 64
    # Augmented view pairs drawn (deterministically) from each held-out image; windows of another
    # pair of the same image are not correspondence candidates.
    _C.RESIM.EVAL.PAIRS_PER_IMAGE = 4

    # ---------------------------------------------------------------- data checks
    _C.RESIM.DATA = CN()
    # Fine-tuning records whose image file is missing (each is logged when the loader is built):
    # "error" stops before training, "skip" trains without them.
    _C.RESIM.DATA.MISSING_IMAGES = "error"

    # ---------------------------------------------------------------- fine-tuning (transfer)
    _C.RESIM.FINETUNE = CN()
    # Norm of the Res5ROIHeadsExtraNorm head: "" (= RESNETS.NORM), a norm name, or "FrozenStatsBN".
    _C.RESIM.FINETUNE.RES5_NORM = ""
    # Load the FPN convs of a converted MODEL.WEIGHTS (ReSim-FPN^T); False ignores them (ReSim-FPN).
    _C.RESIM.FINETUNE.TRANSFER_FPN = False

    # ---------------------------------------------------------------- linear probe
    _C.RESIM.LINEAR_PROBE = CN()
    # Classes of the linear classifier (1000 for ImageNet, 100 for IN-100).
    _C.RESIM.LINEAR_PROBE.NUM_CLASSES = 1000
    # Backbone feature that is globally average-pooled and classified (C5).
    _C.RESIM.LINEAR_PROBE.IN_FEATURE = "res5"
    # Side of the square training crop (RandomResizedCrop) and of the test centre crop, pixels.
    _C.RESIM.LINEAR_PROBE.CROP_SIZE = 224
    # Test images are resized to this short side before the centre crop (MoCo lincls: 256).
    _C.RESIM.LINEAR_PROBE.RESIZE_SIZE = 256
    # RandomResizedCrop area-fraction range (torchvision's default, MoCo lincls).
    _C.RESIM.LINEAR_PROBE.CROP_SCALE = (0.08, 1.0)
    # Images per inference batch of each process (training batch is SOLVER.IMS_PER_BATCH).
    _C.RESIM.LINEAR_PROBE.TEST_IMS_PER_BATCH = 64

    # ---------------------------------------------------------------- GPU views
    # Views made batched on the model's device (RESIM.VIEWS.BACKEND "gpu"; data/gpu_views.py).
    _C.RESIM.GPU_VIEWS = CN()
    # JPEG decoding: "auto" (nvJPEG on a CUDA device, else workers), "device" or "worker" (PIL).
    _C.RESIM.GPU_VIEWS.DECODE = "auto"
    # Taps of the Gaussian blur (odd); 0: the odd number nearest 0.1 * VIEWS.SIZE (23 at 224).
    _C.RESIM.GPU_VIEWS.BLUR_KERNEL_SIZE = 0
    # Batches made ahead in a background thread (on a side CUDA stream); 0: on the training thread.
    _C.RESIM.GPU_VIEWS.PREFETCH = 1
    # Float32 elements of one padded group of images being resampled (caps its memory).
    _C.RESIM.GPU_VIEWS.MAX_GROUP_ELEMENTS = 2**26

    # ---------------------------------------------------------------- speed
    _C.RESIM.SPEED = CN()
    # Autocast dtype for the encoders and heads: "" (fp32) or "bfloat16". With bfloat16 the region
    # logits (window x negative products) are bfloat16 too; sums, logs and losses stay fp32.
    _C.RESIM.SPEED.AMP_DTYPE = ""
    # Channels-last memory format for the encoders.
    _C.RESIM.SPEED.CHANNELS_LAST = False
    # torch.compile the encoders.
    _C.RESIM.SPEED.COMPILE = False
    # torch.compile mode when COMPILE is on: "default", "reduce-overhead" (CUDA graphs, for steps
    # bound by kernel launches; needs static shapes) or "max-autotune-no-cudagraphs".
    _C.RESIM.SPEED.COMPILE_MODE = "default"
    return cfg
