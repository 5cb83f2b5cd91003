"""Typed configuration: defaults < YAML file < ``key=value`` arguments.

Every field carries one line of help (with its unit) and, where it matters,
its allowed values. Unknown keys, wrong types and invalid values raise
``ConfigError`` with one line naming the key and where it came from; the
command line turns that into exit code 2.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifar_dist.errors import ConfigError
from cifar_dist.plugins import is_spec

MODELS = ("seed_resnet", "resnet9", "resnet18")  # built in; model.name may also be package.module:factory

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the paper's Normalize constants
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def _f(default, help, *, choices=None, min=None, max=None, min_exclusive=False, result=True):
    """A dataclass field with its help line and validation rules. ``result=False``: the key does
    not change what is trained or measured (where files go, how they are read, what is shown),
    so a resumed run may change it and ``compare`` groups runs that differ in it."""
    meta = {"help": help, "choices": choices, "min": min, "max": max,
            "min_exclusive": min_exclusive, "result": result}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    root: str = _f("", "directory holding cifar-10-batches-py/ ('' = $CIFAR_DIST_DATA, else ~/.cache/cifar_dist)",
                   result=False)
    loader: str = _f("torch", "input pipeline", choices=("torch", "ffcv", "gpu"), result=False)
    workers: int = _f(2, "loader worker processes per training process (torch, ffcv)", min=0, max=256, result=False)
    beton_dir: str = _f("", "where the ffcv loader keeps its .beton files ('' = <data root>/beton)", result=False)
    synthetic: bool = _f(False, "random CIFAR-shaped, class-dependent data; no files needed")
    synthetic_train: int = _f(4096, "synthetic training images", min=1, max=200_000)
    synthetic_test: int = _f(1024, "synthetic test images", min=1, max=200_000)
    subset: int = _f(0, "use only the first N training images (0 = all)", min=0, max=10_000_000)
    val_split: int = _f(0, "hold out the last N training images for validation "
                           "(0 = evaluate the test set, as the paper did)", min=0, max=10_000_000)
    crop_padding: int = _f(4, "random crop with this zero padding, in pixels (0 = off)", min=0, max=32)
    flip: bool = _f(True, "random horizontal flip")
    cutout: int = _f(0, "side of the random cutout square, in pixels (0 = off)", min=0, max=32)
    color_jitter: float = _f(0.0, "brightness/contrast/saturation/hue jitter strength, "
                                  "as torchvision's ColorJitter(x, x, x, x) (0 = off)", min=0, max=0.5)
    rotation: float = _f(0.0, "random rotation range, in degrees (0 = off)", min=0, max=180)
    mean: list = _f(list(CIFAR_MEAN), "per-channel normalization mean, in [0, 1] units")
    std: list = _f(list(CIFAR_STD), "per-channel normalization std, in [0, 1] units")
    eval_batch_size: int = _f(500, "evaluation batch per process, in images", min=1, max=100_000)


@dataclass
class ModelConfig:
    name: str = _f("seed_resnet", "architecture: seed_resnet, resnet9, resnet18, or your own as "
                                  "package.module:factory (called with the model config and the class count)")
    widths: list = _f([66, 132, 264], "seed_resnet: channels of each stage")
    blocks: list = _f([3, 4, 3], "seed_resnet: BasicBlocks in each stage")
    bn_group: int = _f(0, "BatchNorm normalizes over groups of this many samples (0 = the whole per-process "
                          "micro-batch, classic BN; >0 makes results independent of the process count)", min=0)
    bn_momentum: float = _f(0.1, "BatchNorm running-statistics momentum", min=0, max=1)
    sync_bn: bool = _f(False, "SyncBatchNorm across processes (GPU only)")


@dataclass
class TrainConfig:
    epochs: int = _f(60, "training epochs", min=1, max=1_000_000)
    batch_size: int = _f(128, "GLOBAL batch in images, split evenly across processes", min=1, max=1 << 20)
    accum_steps: int = _f(1, "micro-batches per optimizer step in each process", min=1, max=1 << 16)
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = no cap)", min=0)
    optimizer: str = _f("adam", "optimizer", choices=("adam", "adamw", "sgd"))
    lr: float = _f(1e-3, "peak learning rate", min=0, min_exclusive=True)
    weight_decay: float = _f(1e-4, "weight decay (L2 in the gradient for adam/sgd, decoupled for adamw)", min=0)
    momentum: float = _f(0.9, "sgd momentum", min=0, max=1)
    nesterov: bool = _f(True, "sgd: Nesterov momentum")
    betas: list = _f([0.9, 0.999], "adam/adamw betas")
    optimizer_impl: str = _f("auto", "optimizer kernels: fused (one kernel per step; fp16 loss scaling then "
                                     "needs no host read), foreach, or auto: fused on GPUs, foreach elsewhere",
                             choices=("auto", "fused", "foreach"))
    schedule: str = _f("warmup_cosine", "learning-rate schedule",
                       choices=("constant", "warmup_cosine", "onecycle", "step"))
    schedule_unit: str = _f("step", "the LR changes every optimizer step, or once per epoch like the paper's LambdaLR",
                            choices=("step", "epoch"))
    warmup_epochs: float = _f(5.0, "warm-up (warmup_cosine) or rise (onecycle) length, in epochs", min=0)
    milestones: list = _f([30, 45], "step schedule: epochs at which the LR is multiplied by gamma")
    gamma: float = _f(0.1, "step schedule: LR factor at each milestone", min=0)
    label_smoothing: float = _f(0.1, "label smoothing epsilon", min=0, max=1)
    smoothing_form: str = _f("paper", "paper: eps/(K-1) on each wrong class; torch: eps/K on every class",
                             choices=("paper", "torch"))
    grad_clip: float = _f(0.0, "clip the global gradient norm to this value (0 = off)", min=0)
    exact_reduce: bool = _f(False, "sum gradients of model.bn_group-sized chunks in a fixed tree: bitwise the "
                                   "same weights for any power-of-two process count (slower)")


@dataclass
class RunConfig:
    seed: int = _f(42, "seed of weights, sample order and every augmentation decision", min=0)
    out_dir: str = _f("", "run directory ('' = runs/<config name>-<time>)", result=False)
    deterministic: bool = _f(False, "deterministic algorithms (bitwise-repeatable runs; slower on GPU)")
    compile: bool = _f(False, "torch.compile the model")
    compile_mode: str = _f("default", "torch.compile mode: default; reduce-overhead (CUDA graphs: fewer launches "
                                      "per step); max-autotune (searches kernels: long first compile)",
                           choices=("default", "reduce-overhead", "max-autotune"))
    channels_last: bool = _f(False, "channels_last memory format")
    precision: str = _f("auto", "compute precision; auto: bf16 on GPUs with bf16 tensor cores (compute "
                                "capability >= 8.0), fp16 with loss scaling on older GPUs; on CPUs bf16 where "
                                "the CPU has bf16 units (AMX, AVX-512 bf16) and a sub-second probe finds it "
                                "faster than fp32, else fp32",
                        choices=("auto", "fp32", "bf16", "fp16"))
    tf32: bool = _f(True, "TF32 tensor cores for fp32 matrix products and convolutions on GPUs "
                          "(off under run.deterministic)")
    threads: int = _f(0, "CPU threads per process (0 = PyTorch's default)", min=0, max=4096, result=False)
    tensorboard: bool = _f(True, "write TensorBoard logs when tensorboard is installed", result=False)
    progress: bool = _f(True, "show a progress bar", result=False)
    plots: bool = _f(True, "draw plots/*.png at the end (cifar-dist report RUN_DIR draws them later)", result=False)
    callbacks: list = _f([], "callbacks, each package.module:Class, built with no arguments "
                             "(see cifar_dist/callbacks.py)", result=False)


@dataclass
class CheckpointConfig:
    every_epochs: int = _f(1, "write a resumable checkpoint every N epochs (0 = only at the end)", min=0, result=False)
    every_steps: int = _f(0, "also write one every N optimizer steps (0 = off)", min=0, result=False)
    keep: int = _f(2, "complete checkpoints to keep (older ones are deleted)", min=1, max=10_000, result=False)


@dataclass
class EvalConfig:
    every_epochs: int = _f(1, "evaluate every N epochs (the last epoch is always evaluated)", min=1, result=False)
    tta: bool = _f(False, "flip test-time augmentation at the final evaluation")
    target_acc: float = _f(0.0, "test accuracy to time (0 = off): summary.json gets time_to_target_s and "
                                "epochs_to_target", min=0, max=1)
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


SECTION_CLASSES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig,
                    "run": RunConfig, "checkpoint": CheckpointConfig, "eval": EvalConfig}
_LIST_ITEM = {("model", "widths"): int, ("model", "blocks"): int, ("data", "mean"): float,
              ("data", "std"): float, ("train", "betas"): float, ("train", "milestones"): int,
              ("run", "callbacks"): str}


def result_free_keys() -> frozenset[str]:
    """The keys (and ``name``) that do not change what a run trains or measures: a resumed run may
    change them, and ``compare`` puts runs that differ only in them (and the seed) together."""
    return frozenset({"name"} | {f"{section}.{f.name}" for section, f in iter_fields()
                                 if not f.metadata.get("result", True)})


def iter_fields():
    """Yield (section, dataclass field) for every leaf key, in declaration order."""
    for section, cls in SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            yield section, f


def _coerce(value: Any, default: Any, key: str, where: str):
    """Check ``value`` against the type of ``default``; ints are accepted as floats."""
    def bad(expected):
        return ConfigError(f"{where}: {key}: expected {expected}, got {show(value)}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise bad("a list")
        section, name = key.split(".", 1)
        item = _LIST_ITEM[(section, name)]
        return [_coerce(v, item(0), key, where) for v in value]
    raise AssertionError(f"unhandled default type for {key}")


def _check_range(value, f, key, where):
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where}: {key}: must be one of {', '.join(meta['choices'])}, got {show(value)}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and isinstance(value, (int, float)):
        if value < lo or (meta.get("min_exclusive") and value == lo):
            op = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"{where}: {key}: must be {op} {lo}, got {show(value)}")
    if hi is None and isinstance(value, int) and not isinstance(value, bool):
        hi = MAX_INT  # every integer key: a value past int64 overflows wherever it is used
    if hi is not None and isinstance(value, (int, float)) and value > hi:
        raise ConfigError(f"{where}: {key}: must be <= {hi:,}, got {show(value)}")


def _apply(cfg: Config, key: str, value: Any, where: str) -> None:
    if key == "name":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: name: expected a string, got {show(value)}")
        cfg.name = value
        return
    section, _, name = key.partition(".")
    if section not in SECTION_CLASSES or not name:
        raise ConfigError(f"{where}: unknown key {show(key)}")
    fields = {f.name: f for f in dataclasses.fields(SECTION_CLASSES[section])}
    if name not in fields:
        raise ConfigError(f"{where}: unknown key {show(key)}")
    sub = getattr(cfg, section)
    value = _coerce(value, getattr(sub, name), key, where)
    _check_range(value, fields[name], key, where)
    setattr(sub, name, value)


def _flatten(tree: dict, where: str, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if not isinstance(k, str):
            raise ConfigError(f"{where}: key {show(k)} is not a string")
        key = f"{prefix}{k}"
        if not prefix and k in SECTION_CLASSES:
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: {k}: expected a mapping of keys, got {show(v)}")
            out.update(_flatten(v, where, key + "."))
        elif not prefix and k != "name":
            raise ConfigError(f"{where}: unknown key {show(key)}")
        else:
            out[key] = v
    return out


MAX_INT = 2**63 - 1  # the largest integer any key takes (int64), unless the key says less
MAX_CONFIG_BYTES = 1 << 20  # a config is a page of text; anything near this size is not one
MAX_DEPTH = 8                # sections hold keys, keys hold values or short lists: 3 levels are used


def show(value, limit: int = 60) -> str:
    """A value as an error message shows it: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, made fit for files from anywhere: no aliases (a 700-byte alias bomb
    expands to gigabytes), a bounded nesting depth (deep nesting ends in a RecursionError), and
    YAML 1.2's floats, so that ``3e-4`` and ``1e-3`` are numbers (YAML 1.1 wants ``3.0e-4``)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not accepted in a config",
                                              event.start_mark)
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                              self.peek_event().start_mark)
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth


_ConfigLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(  # 3e-4, 1E5, -2.5e+3: floats, as YAML 1.2 and Python read them
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str, where: str):
    """Parse ``text`` with the config loader; any problem is one ConfigError line naming ``where``."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML{at}: {str(problem)[:120]}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None


def read_yaml(path: str | os.PathLike) -> dict:
    """Load a YAML mapping; a missing, oversized or malformed file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {p.stat().st_size:,} bytes is too large for a config "
                              f"(at most {MAX_CONFIG_BYTES:,})")
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    tree = load_yaml(text, str(p))
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: expected a mapping of sections, got {type(tree).__name__}")
    return tree


def parse_override(arg: str) -> tuple[str, Any]:
    """``train.lr=0.1`` -> ("train.lr", 0.1); the value is read as YAML."""
    key, sep, raw = arg.partition("=")
    if not sep or not key:
        raise ConfigError(f"command line: {show(arg)} is not key=value")
    if len(raw) > 10_000:
        raise ConfigError(f"command line: {key[:60]}: value of {len(raw):,} characters is too long")
    value = load_yaml(raw, f"command line: {key[:60]}") if raw != "" else ""
    return key.strip(), value


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated."""
    cfg, origin = Config(), {}  # key -> where its value came from
    if path:
        cfg.name = Path(path).stem
        for key, value in _flatten(read_yaml(path), str(path)).items():
            _apply(cfg, key, value, str(path))
            origin[key] = str(path)
    for arg in overrides:
        key, value = parse_override(arg)
        _apply(cfg, key, value, "command line")
        origin[key] = "command line"
    validate(cfg, origin)
    return cfg


def validate(cfg: Config, origin: dict | None = None) -> None:
    """Checks that involve more than one key; an error names where the keys' values came from."""
    origin = origin or {}

    def check(ok: bool, keys: tuple, message: str) -> None:
        if not ok:
            places = [origin[k] for k in keys if k in origin]
            where = "command line" if "command line" in places else places[0] if places else "defaults"
            raise ConfigError(f"{where}: {message}")

    m, d, t = cfg.model, cfg.data, cfg.train
    check(m.name in MODELS or is_spec(m.name), ("model.name",),
          f"model.name: must be one of {', '.join(MODELS)} or package.module:factory, got {m.name!r}")
    for spec in cfg.run.callbacks:
        check(is_spec(spec), ("run.callbacks",), f"run.callbacks: {spec!r} is not of the form package.module:Class")
    check(len(m.widths) == len(m.blocks) and bool(m.widths), ("model.widths", "model.blocks"),
          f"model.widths and model.blocks must be non-empty lists of equal length, got {m.widths} and {m.blocks}")
    for key, values, most in (("model.widths", m.widths, 4096), ("model.blocks", m.blocks, 64)):
        check(all(1 <= v <= most for v in values), (key,),
              f"{key}: every entry must be within 1..{most}, got {show(values)}")
    for key, values in (("data.mean", d.mean), ("data.std", d.std)):
        check(len(values) == 3, (key,), f"{key}: expected 3 values (R, G, B), got {values}")
    check(all(v > 0 for v in d.std), ("data.std",), f"data.std: every entry must be > 0, got {d.std}")
    check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), ("train.betas",),
          f"train.betas: expected two values in [0, 1), got {t.betas}")
    if t.exact_reduce:
        check(m.bn_group > 0, ("train.exact_reduce", "model.bn_group"),
              "train.exact_reduce: needs model.bn_group > 0 (the chunk size)")
        chunks = t.batch_size // m.bn_group
        check(t.batch_size % m.bn_group == 0 and not chunks & (chunks - 1),
              ("train.exact_reduce", "train.batch_size", "model.bn_group"),
              f"train.exact_reduce: train.batch_size / model.bn_group must be a power of two, "
              f"got {t.batch_size} / {m.bn_group}")
        check(cfg.run.precision != "fp16", ("train.exact_reduce", "run.precision"),
              "train.exact_reduce: not with run.precision=fp16 (loss scaling)")
    check(not (d.val_split and d.synthetic), ("data.val_split", "data.synthetic"),
          "data.val_split: not available with data.synthetic")


def resolve_data_root(cfg: Config) -> Path:
    """``data.root``, else $CIFAR_DIST_DATA, else ~/.cache/cifar_dist."""
    root = cfg.data.root or os.environ.get("CIFAR_DIST_DATA") or "~/.cache/cifar_dist"
    return Path(root).expanduser()


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    from cifar_dist.files import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
