"""Typed configuration: defaults < YAML file < ``key=value`` arguments; an unknown key, a wrong type or
an invalid value is a one-line ``ConfigError`` naming the key and where it came from (exit code 2)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from yaml.composer import ComposerError

from cifar_dist.config.plugins import is_spec
from cifar_dist.config.schema import MAX_INT, SECTION_CLASSES, Config, choices, field_type, group_class, new_config
from cifar_dist.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # a config is a page of text; anything near this size is not one
MAX_DEPTH = 8  # sections hold keys, keys hold values or short lists: 3 levels are used
CIFAR_TRAIN_IMAGES = 50_000
RENAMED = {"run.tensorboard": "run.trackers ([tensorboard], or [] for none)"}
_SCALARS = {bool: "true or false", int: "an integer", str: "a string"}


def _coerce(value: Any, kind, key: str, where: str):
    """Check ``value`` against the key's declared type; ints are accepted as floats."""

    def refusal(expected):
        return ConfigError(f"{where}: {key}: expected {expected}, got {show(value)}")

    if typing.get_origin(kind) is Literal:
        kind = type(typing.get_args(kind)[0])  # the membership check is _check_range's
    if kind in _SCALARS:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise refusal(_SCALARS[kind])
        return value
    if kind is float or kind == int | float:  # int | float: a count that may be fractional, kept as written
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refusal("a number")
        if not math.isfinite(value):
            raise refusal("a finite number")
        return float(value) if kind is float else value
    if typing.get_origin(kind) is list:
        if not isinstance(value, list):
            raise refusal("a list")
        (item,) = typing.get_args(kind)
        return [_coerce(v, item, key, where) for v in value]
    raise AssertionError(f"{key}: a key of type {kind} cannot be read")


def _check_range(value, section, f, key: str, where: str) -> None:
    meta = f.metadata
    allowed = choices(section, f)
    for item in value if isinstance(value, list) else [value]:
        if allowed is not None and item not in allowed and not (meta.get("specs") and is_spec(item)):
            extra = " or package.module:factory" if meta.get("specs") else ""
            raise ConfigError(f"{where}: {key}: must be one of {', '.join(allowed)}{extra}, got {show(item)}")
    if not isinstance(value, (int, float)):
        return
    lo, hi, above, below = (meta.get(k) for k in ("min", "max", "min_exclusive", "max_exclusive"))
    if hi is None and isinstance(value, int) and not isinstance(value, bool):
        hi = MAX_INT  # every integer key: a value past int64 overflows wherever it is used
    if lo is not None and (value < lo or (above and value == lo)):
        raise ConfigError(f"{where}: {key}: must be {'>' if above else '>='} {lo}, got {show(value)}")
    if hi is not None and (value > hi or (below and value == hi)):
        raise ConfigError(f"{where}: {key}: must be {'<' if below else '<='} {hi:,}, got {show(value)}")


def _typed(value: Any, owner, f, key: str, where: str):
    """``value`` for the key ``f`` of ``owner`` (a section name or a group class), checked."""
    aliases = f.metadata.get("aliases") or {}
    if isinstance(value, bool) and value in aliases:  # eval.tta=true: the old spelling of flip
        value = aliases[value]
    value = _coerce(value, field_type(owner, f), key, where)
    _check_range(value, owner, f, key, where)
    return value


def _group(value: Any, group, key: str, where: str):
    """A group's value: null/false (off), true (every default) or a mapping of its keys."""
    if value is None or value is False:
        return None
    if value is True:
        return group()
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}: expected a mapping of keys, true or null, got {show(value)}")
    out = group()
    for name, v in value.items():
        _set_in_group(out, f"{key}.{name}", str(name), v, where)
    return out


def _set_in_group(obj, key: str, name: str, value: Any, where: str) -> None:
    fields = {g.name: g for g in dataclasses.fields(obj)}
    if name not in fields:
        raise ConfigError(f"{where}: unknown key {show(key)} (keys: {', '.join(fields)})")
    setattr(obj, name, _typed(value, type(obj), fields[name], key, where))


def _apply(cfg: Config, key: str, value: Any, where: str) -> None:
    if key == "name":
        cfg.name = _coerce(value, str, key, where)
        return
    if key in RENAMED:
        raise ConfigError(f"{where}: {key} is now {RENAMED[key]}")
    section, _, rest = key.partition(".")
    name, _, sub = rest.partition(".")
    fields = {f.name: f for f in dataclasses.fields(SECTION_CLASSES[section])} if section in SECTION_CLASSES else {}
    group = group_class(section, fields[name]) if name in fields else None
    if name not in fields or (sub and group is None):
        raise ConfigError(f"{where}: unknown key {show(key)}")
    holder = getattr(cfg, section)
    if group is None:
        setattr(holder, name, _typed(value, section, fields[name], key, where))
    elif not sub:
        setattr(holder, name, _group(value, group, key, where))
    else:  # one key of a group: turns the group on
        if getattr(holder, name) is None:
            setattr(holder, name, group())
        _set_in_group(getattr(holder, name), key, sub, value, where)


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


def show(value, limit: int = 60) -> str:
    """A value as an error message shows it: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, made fit for files from anywhere: no aliases (a 700-byte alias bomb
    expands to gigabytes), a bounded nesting depth (deep nesting ends in a RecursionError), and
    YAML 1.2's floats, so that ``3e-4`` and ``1e-3`` are numbers (YAML 1.1 wants ``3.0e-4``)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ComposerError(None, None, f"aliases (*{event.anchor}) are not accepted in a config", event.start_mark)
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth


_ConfigLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(  # 3e-4, 1E5, -2.5e+3: floats, as YAML 1.2 and Python read them
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


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
        if (size := p.stat().st_size) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {size:,} bytes is too large for a config (at most {MAX_CONFIG_BYTES:,})")
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


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated."""
    cfg, origin = new_config(), {}  # key -> where its value came from
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


def validate(cfg: Config, origin: dict | None = None, *, deepspeed: bool = False, auto_precision: bool = False) -> None:
    """Every rule that involves more than one key, each once, naming where the keys' values came from;
    run at loading, again under DeepSpeed and once ``run.precision: auto`` is resolved (``auto_precision``)."""

    def fail(keys: tuple, message: str) -> typing.NoReturn:
        if origin is None:  # a config checked again, after loading: its places are not known here
            raise ConfigError(message)
        places = [origin[k] for k in keys if k in origin]
        where = "command line" if "command line" in places else places[0] if places else "defaults"
        raise ConfigError(f"{where}: {message}")

    def check(ok: bool, keys: tuple, problem: str) -> None:
        """Refuse ``problem`` of the first of ``keys`` unless ``ok``."""
        if not ok:
            fail(keys, f"{keys[0]}: {problem}")

    m, d, t = cfg.model, cfg.data, cfg.train
    for spec in cfg.run.callbacks:
        check(is_spec(spec), ("run.callbacks",), f"{spec!r} is not of the form package.module:Class")
    if not (len(m.widths) == len(m.blocks) and m.widths):
        fail(
            ("model.widths", "model.blocks"),
            f"model.widths and model.blocks must be non-empty lists of equal length, got {m.widths} and {m.blocks}",
        )
    for key, sizes, most in (("model.widths", m.widths, 4096), ("model.blocks", m.blocks, 64)):
        check(all(1 <= v <= most for v in sizes), (key,), f"every entry must be within 1..{most}, got {show(sizes)}")
    for key, values in (("data.mean", d.mean), ("data.std", d.std)):
        check(len(values) == 3, (key,), f"expected 3 values (R, G, B), got {values}")
    check(all(v > 0 for v in d.std), ("data.std",), f"every entry must be > 0, got {d.std}")
    check(
        len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
        ("train.betas",),
        f"expected two values in [0, 1), got {t.betas}",
    )
    if t.exact_reduce:
        check(m.bn_group > 0, ("train.exact_reduce", "model.bn_group"), "needs model.bn_group > 0 (the chunk size)")
        chunks = t.batch_size // m.bn_group
        check(
            t.batch_size % m.bn_group == 0 and not chunks & (chunks - 1),
            ("train.exact_reduce", "train.batch_size", "model.bn_group"),
            f"train.batch_size / model.bn_group must be a power of two, got {t.batch_size} / {m.bn_group}",
        )
        chose = "; run.precision=auto chose fp16 on this GPU" if auto_precision else ""
        check(
            cfg.run.precision != "fp16",
            ("train.exact_reduce", "run.precision"),
            f"not with run.precision=fp16 (loss scaling{chose}); set run.precision=fp32 or bf16",
        )
    check(
        not (cfg.eval.use_ema and t.ema is None),
        ("eval.use_ema", "train.ema"),
        "needs train.ema (e.g. train.ema.decay=0.999)",
    )
    check(not (d.val_split and d.synthetic), ("data.val_split", "data.synthetic"), "not available with data.synthetic")
    images = d.synthetic_train if d.synthetic else CIFAR_TRAIN_IMAGES
    check(d.val_split < images, ("data.val_split",), f"{d.val_split} leaves no training images of {images}")
    left = images - d.val_split
    check(d.subset <= left, ("data.subset", "data.val_split"), f"{d.subset} is more than the {left} training images")
    check(
        t.batch_size <= train_images(cfg),
        ("train.batch_size", "data.subset", "data.val_split", "data.synthetic_train"),
        f"{t.batch_size} is larger than the {train_images(cfg)} training images",
    )
    if deepspeed:
        problem = "DeepSpeed reduces gradients itself; set train.exact_reduce=false to train with DeepSpeed"
        check(not t.exact_reduce, ("train.exact_reduce",), problem)
        for key, on in (("train.ema", t.ema is not None), ("train.lookahead", t.lookahead is not None)):
            # the engine's optimizer updates weights of its own, partitioned
            check(not on, (key,), f"not with DeepSpeed (its engine owns the weights); set {key}=null")


def train_images(cfg: Config) -> int:
    """How many images one training epoch draws from, from the config alone (no file is read)."""
    d = cfg.data
    n = (d.synthetic_train if d.synthetic else CIFAR_TRAIN_IMAGES) - d.val_split
    return min(n, d.subset) if d.subset else n


def resolve_data_root(cfg: Config) -> Path:
    """``data.root``, else $CIFAR_DIST_DATA, else ~/.cache/cifar_dist."""
    root = cfg.data.root or os.environ.get("CIFAR_DIST_DATA") or "~/.cache/cifar_dist"
    return Path(root).expanduser()


def config_from_dict(tree: dict, where: str) -> Config:
    """A validated config from the nested form of ``Config.to_dict()``; an error names ``where``."""
    cfg = new_config()
    for key, value in _flatten(tree, where).items():
        _apply(cfg, key, value, where)
    validate(cfg)
    return cfg
