"""The configuration schema: every key once, with its type, default, help and range; loading,
validation, the reference, resume and ``compare`` all derive from these declarations."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from cifar_dist.config.registry import LOADERS, MODELS, PRECISIONS

MAX_INT = 2**63 - 1  # the largest integer any key takes (int64), unless the key says less
FLOAT32_MAX = 3.4e38  # a float key without a bound of its own stays below float32's largest value


def _f(
    default,
    help,
    *,
    min=None,
    max=None,
    above=None,
    below=None,
    result=True,
    registry: dict | None = None,
    also: tuple = (),
    specs: bool = False,
    aliases: dict | None = None,
):
    """A dataclass field with its help line and rules: ``min``/``max`` inclusive and ``above``/``below``
    exclusive bounds; ``result=False`` for a key that changes nothing a run trains or measures (a resume
    may change it); ``registry`` the names it accepts, with ``also`` and, with ``specs``,
    ``package.module:name``; ``aliases`` values read as others (``{True: "flip"}``)."""
    if max is None and below is None and isinstance(default, float):  # what float32 tensors can hold
        max = FLOAT32_MAX
    meta = {
        "help": help,
        "min": min if above is None else above,
        "max": max if below is None else below,
        "min_exclusive": above is not None,
        "max_exclusive": below is not None,
        "result": result,
        "registry": registry,
        "also": also,
        "specs": specs,
        "aliases": aliases or {},
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# Groups: keys whose value is a mapping of keys, off (null) by default (docs/averaging.md).
@dataclass
class EmaConfig:
    decay: float = _f(0.999, "weight the average keeps at each update, in (0, 1)", above=0, below=1)
    every_steps: int = _f(1, "update the average every N optimizer steps", min=1, max=1_000_000)
    warmup_steps: int = _f(
        0, "for the first N optimizer steps the average is a plain copy of the weights (decay 0)", min=0
    )


@dataclass
class LookaheadConfig:
    k: int = _f(5, "fast optimizer steps between two updates of the slow weights", min=1, max=100_000)
    alpha: float = _f(0.5, "the slow weights move this fraction of the way to the fast ones", above=0, max=1)
    ramp_power: float = _f(
        0.0,
        "with p > 0 the fraction falls from 1 at step 0 to alpha at the schedule's last step as "
        "1 - (1 - alpha) (step / steps)^p (airbench: 3); 0: alpha at every update",
        min=0,
        max=100,
    )
    buffers: bool = _f(False, "average the BatchNorm running statistics too (airbench), not only the parameters")
    end_on_slow: bool = _f(
        False, "after the run's last step the model takes the slow weights (airbench), whatever the step count"
    )


@dataclass
class ProfileConfig:
    start_step: int = _f(
        5, "first profiled optimizer step (global, from 0); the step before it warms the profiler up", min=1
    )
    steps: int = _f(3, "optimizer steps recorded", min=1, max=1_000)


GROUP_CLASSES = (EmaConfig, LookaheadConfig, ProfileConfig)


@dataclass
class DataConfig:
    root: str = _f(
        "", "directory holding cifar-10-batches-py/ ('' = $CIFAR_DIST_DATA, else ~/.cache/cifar_dist)", result=False
    )
    loader: str = _f("torch", "input pipeline", registry=LOADERS, result=False)
    workers: int = _f(2, "loader worker processes per training process (torch, ffcv)", min=0, max=256, result=False)
    beton_dir: str = _f("", "where the ffcv loader keeps its .beton files ('' = <data root>/beton)", result=False)
    synthetic: bool = _f(False, "random CIFAR-shaped, class-dependent data; no files needed")
    synthetic_train: int = _f(4096, "synthetic training images", min=1, max=200_000)
    synthetic_test: int = _f(1024, "synthetic test images", min=1, max=200_000)
    subset: int = _f(0, "use only the first N training images (0 = all)", min=0, max=10_000_000)
    val_split: int = _f(
        0,
        "hold out the last N training images for validation (0 = evaluate the test set, as the paper did)",
        min=0,
        max=10_000_000,
    )
    crop_padding: int = _f(4, "random crop of an image padded by this many pixels (0 = off)", min=0, max=32)
    crop_pad_mode: Literal["zeros", "reflect"] = _f(
        "zeros",
        "what the crop's padding holds: zeros (torchvision's RandomCrop) or the image mirrored at its "
        "border (reflect: airbench's translate)",
    )
    flip: Literal["none", "random", "alternating"] = _f(
        "random",
        "horizontal flip: random (each image, each epoch, with probability 1/2); alternating (each "
        "image flipped in every other epoch, whether in the first one at random: airbench's); none. "
        "true and false read as random and none",
        aliases={True: "random", False: "none"},
    )
    cutout: int = _f(0, "side of the random cutout square, in pixels (0 = off)", min=0, max=32)
    color_jitter: float = _f(
        0.0,
        "brightness/contrast/saturation/hue jitter strength, as torchvision's ColorJitter(x, x, x, x) (0 = off)",
        min=0,
        max=0.5,
    )
    rotation: float = _f(0.0, "random rotation range, in degrees (0 = off)", min=0, max=180)
    # the paper's Normalize constants
    mean: list[float] = _f([0.4914, 0.4822, 0.4465], "per-channel normalization mean, in [0, 1] units")
    std: list[float] = _f([0.2023, 0.1994, 0.2010], "per-channel normalization std, in [0, 1] units")
    eval_batch_size: int = _f(500, "evaluation batch per process, in images", min=1, max=100_000)


@dataclass
class ModelConfig:
    name: str = _f(
        "seed_resnet",
        "architecture, or your own as package.module:factory (called with the model config and the class count)",
        registry=MODELS,
        specs=True,
    )
    widths: list[int] = _f([66, 132, 264], "seed_resnet: channels of each stage")
    blocks: list[int] = _f([3, 4, 3], "seed_resnet: BasicBlocks in each stage")
    bn_group: int = _f(
        0,
        "BatchNorm normalizes over groups of this many samples (0 = the whole per-process "
        "micro-batch, classic BN; >0 makes results independent of the process count)",
        min=0,
    )
    bn_momentum: float = _f(0.1, "BatchNorm running-statistics momentum", min=0, max=1)
    sync_bn: bool = _f(False, "SyncBatchNorm across processes (GPU only)")
    whiten_bias_epochs: int = _f(
        3, "airbench94: epochs in which the whitening layer's bias trains (it is frozen after them)", min=0
    )


@dataclass
class TrainConfig:
    epochs: int | float = _f(
        60,
        "training epochs; a fraction ends the last epoch early, after ceil(epochs x steps per epoch) steps in all",
        above=0,
        max=1_000_000,
    )
    batch_size: int = _f(128, "GLOBAL batch in images, split evenly across processes", min=1, max=1 << 20)
    accum_steps: int = _f(1, "micro-batches per optimizer step in each process", min=1, max=1 << 16)
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = no cap)", min=0)
    optimizer: Literal["adam", "adamw", "sgd"] = _f("adam", "optimizer")
    lr: float = _f(1e-3, "peak learning rate", above=0)
    weight_decay: float = _f(1e-4, "weight decay (L2 in the gradient for adam/sgd, decoupled for adamw)", min=0)
    momentum: float = _f(0.9, "sgd momentum", min=0, max=1)
    nesterov: bool = _f(True, "sgd: Nesterov momentum")
    betas: list[float] = _f([0.9, 0.999], "adam/adamw betas")
    optimizer_impl: Literal["auto", "fused", "foreach"] = _f(
        "auto",
        "optimizer kernels: fused (one kernel per step; fp16 loss scaling then needs no host read), "
        "foreach, or auto: fused on GPUs, foreach elsewhere",
    )
    schedule: Literal["constant", "warmup_cosine", "onecycle", "step"] = _f("warmup_cosine", "learning-rate schedule")
    schedule_unit: Literal["step", "epoch"] = _f(
        "step", "the LR changes every optimizer step, or once per epoch like the paper's LambdaLR"
    )
    warmup_epochs: float = _f(5.0, "warm-up (warmup_cosine) or rise (onecycle) length, in epochs", min=0)
    lr_start_factor: float = _f(
        0.0, "onecycle: the learning rate rises from train.lr x this (airbench: 0.2)", min=0, max=1
    )
    lr_end_factor: float = _f(
        0.0, "onecycle: the learning rate falls to train.lr x this at the end (airbench: 0.07)", min=0, max=1
    )
    norm_lr_scale: float = _f(
        1.0,
        "the learning rate of normalization layers' parameters is train.lr x this, and their weight decay "
        "train.weight_decay / this, so that an SGD or AdamW step decays them as much as the rest (airbench's "
        "BatchNorm bias scaler: 64)",
        above=0,
    )
    milestones: list[int] = _f([30, 45], "step schedule: epochs at which the LR is multiplied by gamma")
    gamma: float = _f(0.1, "step schedule: LR factor at each milestone", min=0)
    label_smoothing: float = _f(0.1, "label smoothing epsilon", min=0, max=1)
    smoothing_form: Literal["paper", "torch"] = _f(
        "paper", "paper: eps/(K-1) on each wrong class; torch: eps/K on every class"
    )
    grad_clip: float = _f(0.0, "clip the global gradient norm to this value (0 = off)", min=0)
    exact_reduce: bool = _f(
        False,
        "sum gradients of model.bn_group-sized chunks in a fixed tree: bitwise the "
        "same weights for any power-of-two process count (slower)",
    )
    no_decay: list[Literal["norm", "bias"]] = _f(
        [],
        "parameters trained with weight decay 0 (a parameter group of their own): norm (the weights and "
        "biases of BatchNorm and other normalization layers), bias (every parameter named bias: conv, "
        "linear and norm biases); the rest keep train.weight_decay",
    )
    ema: EmaConfig | None = _f(
        None, "an exponential moving average of the weights and BatchNorm buffers, kept in fp32 (null = off)"
    )
    lookahead: LookaheadConfig | None = _f(
        None, "Lookahead: slow weights pulled toward the optimizer's weights every k steps (null = off)"
    )


@dataclass
class RunConfig:
    seed: int = _f(42, "seed of weights, sample order and every augmentation decision", min=0)
    out_dir: str = _f("", "run directory ('' = runs/<config name>-<time>)", result=False)
    deterministic: bool = _f(False, "deterministic algorithms (bitwise-repeatable runs; slower on GPU)")
    compile: bool = _f(False, "torch.compile the model")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = _f(
        "default",
        "torch.compile mode: default; reduce-overhead (CUDA graphs: fewer launches per step); "
        "max-autotune (searches kernels: long first compile)",
    )
    channels_last: bool = _f(False, "channels_last memory format")
    precision: str = _f(
        "auto",
        "compute precision; auto: bf16 on GPUs with bf16 tensor cores (compute "
        "capability >= 8.0), fp16 with loss scaling on older GPUs; on CPUs bf16 where "
        "the CPU has bf16 units (AMX, AVX-512 bf16), else fp32",
        registry=PRECISIONS,
        also=("auto",),
    )
    tf32: bool = _f(
        True, "TF32 tensor cores for fp32 matrix products and convolutions on GPUs (off under run.deterministic)"
    )
    threads: int = _f(0, "CPU threads per process (0 = PyTorch's default)", min=0, max=4096, result=False)
    collective_timeout_s: int = _f(
        600,
        "seconds a collective (and the process group's start) waits for every process before the job "
        "fails naming it: long enough for the slowest rank's checkpoint write or evaluation",
        min=1,
        max=86_400,
        result=False,
    )
    trackers: list[str] = _f(
        ["tensorboard"],
        "experiment trackers, through Accelerate: tensorboard, wandb, mlflow, aim, clearml, dvclive, "
        "comet_ml, ... ([] = none; each is installed by the user); rank 0 logs",
        result=False,
    )
    log_every_steps: int = _f(
        0,
        "also send the training loss to the trackers every N optimizer steps, at the loop's control reads "
        "(0 = the epoch rows only)",
        min=0,
        result=False,
    )
    profile: ProfileConfig | None = _f(
        None,
        "torch.profiler over a few training steps: traces per rank in <run dir>/profile/ (null = off)",
        result=False,
    )
    progress: bool = _f(True, "show a progress bar", result=False)
    plots: bool = _f(True, "draw plots/*.png at the end (cifar-dist report RUN_DIR draws them later)", result=False)
    callbacks: list[str] = _f(
        [], "callbacks, each package.module:Class, built with no arguments (see docs/extending.md)", result=False
    )


@dataclass
class CheckpointConfig:
    every_epochs: int = _f(1, "write a resumable checkpoint every N epochs (0 = only at the end)", min=0, result=False)
    every_steps: int = _f(0, "also write one every N optimizer steps (0 = off)", min=0, result=False)
    keep: int = _f(2, "complete checkpoints to keep (older ones are deleted)", min=1, max=10_000, result=False)


@dataclass
class EvalConfig:
    every_epochs: int = _f(1, "evaluate every N epochs (the last epoch is always evaluated)", min=1, result=False)
    tta: Literal["none", "flip", "flip_translate"] = _f(
        "none",
        "test-time augmentation, the logits averaged over views: flip, the image and its mirror (1/2 "
        "each, 2 forward passes); flip_translate, airbench's: those two (1/4 each) and the image shifted "
        "by 1 pixel down-right and by 1 up-left (reflect padding), each with its mirror (1/8 each; 6 "
        "forward passes); true and false read as flip and none",
        aliases={True: "flip", False: "none"},
    )
    tta_every_epoch: bool = _f(
        False, "use eval.tta at every evaluation (metrics.jsonl's test_acc), not only at the final one"
    )
    use_ema: bool = _f(False, "evaluate the EMA weights (needs train.ema); model.safetensors holds them")
    target_acc: float = _f(
        0.0, "test accuracy to time (0 = off): summary.json gets time_to_target_s and epochs_to_target", min=0, max=1
    )
    stop_at_target: bool = _f(False, "end the run at the first evaluation at or above eval.target_acc")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = field(default="default", metadata={"help": "recipe name (used in the default run directory)"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTION_CLASSES: dict = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != "name"}


def new_config() -> Config:
    """A config of defaults of the section classes in ``SECTION_CLASSES`` now (a test may add one)."""
    return Config(**{section: cls() for section, cls in SECTION_CLASSES.items()})


_hints = functools.cache(typing.get_type_hints)


def field_type(section, f: dataclasses.Field):
    """The declared type of a key of a section (by name) or of a group (by class)."""
    return _hints(SECTION_CLASSES[section] if isinstance(section, str) else section)[f.name]


def group_class(section, f: dataclasses.Field):
    """The group class of a key (``EmaConfig`` for train.ema), else None."""
    t = field_type(section, f)
    args = typing.get_args(t) if typing.get_origin(t) in (typing.Union, types.UnionType) else (t,)
    return next((a for a in args if a in GROUP_CLASSES), None)


def choices(section, f: dataclasses.Field) -> tuple | None:
    """The values a key (or each item of a list key) accepts when they are a closed set: its
    Literal's, or its registry's names (and ``also``); None for an open key."""
    t = field_type(section, f)
    if typing.get_origin(t) is list:
        (t,) = typing.get_args(t)
    if typing.get_origin(t) is Literal:
        return typing.get_args(t)
    registry = f.metadata.get("registry")
    return (*f.metadata.get("also", ()), *registry) if registry is not None else None


def result_free_keys() -> frozenset[str]:
    """The keys (and ``name``) that change nothing a run trains or measures."""
    keys = {"name"}
    for section, f in iter_fields():
        result_free = not f.metadata.get("result", True)
        if result_free:
            keys.add(f"{section}.{f.name}")
        group = group_class(section, f)
        for g in dataclasses.fields(group) if group else ():
            if result_free or not g.metadata.get("result", True):
                keys.add(f"{section}.{f.name}.{g.name}")
    return frozenset(keys)


# Result-free keys that change the result in some configurations: (key, when, why). There,
# --resume refuses a change of the key and compare keeps runs that differ in it apart.
RESULT_WHEN = (
    (
        "eval.every_epochs",
        lambda flat: bool(flat.get("eval.target_acc")),
        "when eval.target_acc is set: the evaluations time the target (time_to_target_s) and, with "
        "eval.stop_at_target, end the run",
    ),
)


def result_keys_in(flat: dict) -> frozenset[str]:
    """RESULT_WHEN's keys that change the result of the ``flatten_keys`` configuration ``flat``."""
    return frozenset(key for key, when, _ in RESULT_WHEN if when(flat))


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def flatten_keys(d: dict) -> dict:
    """{"train": {"lr": 1, "ema": {"decay": 0.9}}} -> {"train.lr": 1, "train.ema": {"decay": 0.9}}:
    one entry per key of a section, a group's value whole (how ``compare`` names what differs)."""
    flat = {f"{section}.{k}": v for section, keys in d.items() if isinstance(keys, dict) for k, v in keys.items()}
    return flat | {k: v for k, v in d.items() if not isinstance(v, dict)}


def iter_fields():
    """(section, dataclass field) of every key of a section, in declaration order."""
    return ((section, f) for section, cls in SECTION_CLASSES.items() for f in dataclasses.fields(cls))
