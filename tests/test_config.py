"""Config precedence and validation: defaults < YAML < key=value; bad input exits 2 in one line."""

from __future__ import annotations

import pytest
import yaml

from cifar_dist.config.loading import load_config
from cifar_dist.config.schema import Config, iter_fields
from cifar_dist.errors import ConfigError

from conftest import REPO, SMOKE, cli_here


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_precedence_defaults_file_then_command_line(tmp_path):
    default = Config()
    path = write(tmp_path, "train:\n  lr: 0.5\n  epochs: 3\nmodel:\n  widths: [4, 8, 16]\n")
    cfg = load_config(path, ["train.lr=0.25"])
    assert cfg.train.lr == 0.25  # command line beats the file
    assert cfg.train.epochs == 3  # file beats the default
    assert cfg.model.widths == [4, 8, 16]
    assert cfg.train.batch_size == default.train.batch_size  # untouched default
    assert cfg.name == "c"


def test_int_accepted_for_float_and_values_read_as_yaml():
    cfg = load_config(None, ["train.lr=1", "model.blocks=[1,1,1]", "run.compile=true", "data.loader=gpu"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.blocks == [1, 1, 1] and cfg.run.compile is True and cfg.data.loader == "gpu"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=0.1", "unknown key 'train.lrr'"),
        ("trian.lr=0.1", "unknown key 'trian.lr'"),
        ("train.epochs=two", "train.epochs: expected a number"),
        ("train.epochs=0", "train.epochs: must be > 0"),
        ("run.compile=1", "run.compile: expected true or false"),
        ("train.lr=-0.1", "train.lr: must be > 0"),
        ("train.lr=0", "train.lr: must be > 0"),
        ("data.loader=dali", "data.loader: must be one of torch, ffcv, gpu"),
        ("model.widths=[8,16]", "model.widths and model.blocks"),
        ("train.exact_reduce=true", "train.exact_reduce: needs model.bn_group"),
        ("novalue", "is not key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)
    assert "command line" in str(e.value)


def test_unknown_section_and_nested_unknown_key_in_file(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'optim'"):
        load_config(write(tmp_path, "optim:\n  lr: 1\n"))
    with pytest.raises(ConfigError, match=r"train.lr: expected a number, got {'peak': 1}"):
        load_config(write(tmp_path, "train:\n  lr:\n    peak: 1\n"))


def test_every_field_has_help_and_the_shipped_configs_load():
    for section, f in iter_fields():
        assert f.metadata.get("help"), f"{section}.{f.name} has no help line"
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_seed_yaml_is_the_papers_recipe():
    cfg = load_config(REPO / "configs" / "seed.yaml")
    t, d, m = cfg.train, cfg.data, cfg.model
    assert (m.name, m.widths, m.blocks) == ("seed_resnet", [66, 132, 264], [3, 4, 3])
    assert (t.optimizer, t.lr, t.weight_decay, t.batch_size, t.epochs) == ("adam", 1e-3, 1e-4, 128, 60)
    assert (t.schedule, t.schedule_unit, t.warmup_epochs) == ("warmup_cosine", "epoch", 5)
    assert (t.label_smoothing, t.smoothing_form) == (0.1, "paper")
    assert (d.crop_padding, d.flip, d.color_jitter, d.rotation, d.cutout) == (4, "random", 0.1, 10, 0)
    assert d.mean == [0.4914, 0.4822, 0.4465] and d.std == [0.2023, 0.1994, 0.2010]
    assert (cfg.run.seed, d.val_split, cfg.run.precision, m.bn_group) == (42, 0, "fp32", 0)


BAD_FILES = {
    "unknown_key": ("data:\n  bogus: 1\n", "unknown key 'data.bogus'"),
    "wrong_type": ("train:\n  batch_size: big\n", "train.batch_size: expected an integer"),
    "negative_lr": ("train:\n  lr: -0.001\n", "train.lr: must be > 0"),
    "malformed": ("train:\n  lr: [0.1\n", "malformed YAML"),
    "not_a_mapping": ("- 1\n- 2\n", "expected a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_file_exits_2_with_one_line(tmp_path, case):
    text, fragment = BAD_FILES[case]
    path = write(tmp_path, text, f"{case}.yaml")
    out = tmp_path / "run"
    res = cli_here("train", "--config", path, "--out", out)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert str(path) in lines[0] and fragment in lines[0]
    assert not out.exists()  # nothing was created


def test_missing_config_file_exits_2(tmp_path):
    res = cli_here("train", "--config", tmp_path / "nope.yaml")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"cifar-dist: {tmp_path / 'nope.yaml'}: config file not found"]


def test_config_command_prints_the_resolved_config():
    res = cli_here("config", "--config", REPO / "configs" / "smoke.yaml", "train.lr=0.3")
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout)
    assert resolved["train"]["lr"] == 0.3 and resolved["model"]["widths"] == [8, 16, 32]


def test_docs_carry_the_current_config_reference():
    from cifar_dist.config.reference import reference_markdown

    page = (REPO / "docs" / "configuration.md").read_text()
    block = page.split("<!-- config-reference -->\n", 1)[1].split("<!-- /config-reference -->", 1)[0]
    assert block == reference_markdown(), (
        "docs/configuration.md is stale: paste `cifar-dist config --reference` into it"
    )


def test_an_error_line_is_written_in_one_piece(monkeypatch):
    """Ranks that fail together share one stderr pipe: each line must go out in a single
    write, or two ranks' messages run into one line."""
    from cifar_dist.distributed.launcher import rank_prefix
    from cifar_dist.errors import fail

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr("sys.stderr", Recorder())
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        fail("train.batch_size: 65 is not divisible by 2 processes", 2, rank_prefix())
    assert e.value.code == 2
    assert writes == ["cifar-dist: rank 1: train.batch_size: 65 is not divisible by 2 processes\n"]


def test_more_processes_than_visible_gpus_are_refused(tmp_path, monkeypatch):
    """8 processes on a node that shows 4 GPUs (simulated): exit 2, one line, no run directory."""
    import torch

    from cifar_dist.trainer import build

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(build, "gpu_capability", lambda: (9, 0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    out = tmp_path / "run"
    res = cli_here("train", "--config", REPO / "configs" / "smoke.yaml", "--out", out)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "cifar-dist: 8 processes on this node but 4 visible GPU(s) (CUDA_VISIBLE_DEVICES=0,1,2,3); start at most 4 "
        "(accelerate launch --num_processes, torchrun --nproc_per_node)"
    ]
    assert not out.exists()


def test_launch_configs_assume_no_gpu_count():
    for name in ("multi_gpu.yaml", "multi_node.yaml", "deepspeed_zero2.yaml"):
        launch = yaml.safe_load((REPO / "launch" / name).read_text())
        assert "num_processes" not in launch, name


@pytest.mark.parametrize("capability, expected", [(None, "fp32"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_precision_auto_follows_the_gpu_generation(capability, expected):
    """auto: fp32 on CPUs, fp16 with loss scaling before bf16 tensor cores (V100: 7.0), bf16 from 8.0."""
    from cifar_dist.runtime.hardware import resolve_precision

    assert resolve_precision("auto", capability) == (expected, None)
    assert resolve_precision("fp32", capability) == ("fp32", None)


def test_bf16_on_a_gpu_without_bf16_tensor_cores_warns_in_one_line(monkeypatch, capsys):
    from cifar_dist.config.loading import load_config
    from cifar_dist.trainer import build
    from cifar_dist.trainer.build import resolve_run_precision

    monkeypatch.setattr(build, "gpu_capability", lambda: (7, 0))
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["run.precision=bf16", "train.exact_reduce=false"])
    resolve_run_precision(cfg)
    assert cfg.run.precision == "bf16"
    assert capsys.readouterr().err.splitlines() == [
        "cifar-dist: warning: run.precision=bf16 on a GPU of compute capability 7.0: it has no bf16 tensor cores "
        "(they came with 8.0); fp16 or auto is much faster there"
    ]
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["run.precision=auto"])  # exact_reduce: true
    with pytest.raises(ConfigError, match=r"run.precision=auto chose fp16 on this GPU"):
        resolve_run_precision(cfg)


def test_tf32_switches_gpu_matmuls_and_convolutions(monkeypatch):
    import torch

    from cifar_dist.runtime.seeding import apply_tf32, set_tf32

    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    before = flags()
    try:
        set_tf32(True)
        assert flags() == (True, True)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32",) * 2
        set_tf32(False)
        assert flags() == (False, False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert apply_tf32(load_config(None).run) is False  # no GPU: nothing to switch
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert apply_tf32(load_config(None).run) is True  # on by default on a GPU
        assert flags() == (True, True)
        assert apply_tf32(load_config(None, ["run.deterministic=true"]).run) is False
        assert flags() == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_scientific_notation_is_a_number_in_files_and_on_the_command_line(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-3\n  weight_decay: 5E-4\n"), ["train.gamma=2.5e-1"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.gamma) == (1e-3, 5e-4, 0.25)
    res = cli_here("config", "--config", REPO / "configs" / "seed.yaml", "train.lr=3e-4")
    assert res.returncode == 0 and yaml.safe_load(res.stdout)["train"]["lr"] == 3e-4, res.stderr
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):
        load_config(None, ["train.batch_size=1e3"])


def _one_line_exit_2(*args):
    res = cli_here(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cifar-dist: ") and len(lines[0]) < 400, res.stderr
    return lines[0]


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """Nine levels of aliases, nine times each: 700 bytes that PyYAML would expand to 387 million
    strings. Refused at the first alias, before any expansion."""
    import resource
    import time

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    bomb = write(tmp_path, "\n".join(lines) + "\n", "bomb.yaml")
    assert bomb.stat().st_size < 800
    before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time()
    line = _one_line_exit_2("config", "--config", bomb)
    assert "aliases (*a) are not accepted in a config" in line and str(bomb) in line
    assert time.time() - t0 < 10 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_deep_nesting_and_oversized_values_are_refused_in_one_short_line(tmp_path):
    deep = write(tmp_path, "train:\n  betas: " + "[" * 5000 + "]" * 5000 + "\n", "deep.yaml")
    assert "nested deeper than" in _one_line_exit_2("config", "--config", deep)
    line = _one_line_exit_2("config", "train.optimizer=" + "x" * 5000)
    assert "train.optimizer: must be one of adam, adamw, sgd, got 'xxxx" in line and len(line) < 200


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("run.seed=18446744073709551616", "run.seed: must be <= 9,223,372,036,854,775,807"),  # 2**64
        ("run.seed=-1", "run.seed: must be >= 0"),
        ("data.crop_padding=100000000", "data.crop_padding: must be <= 32"),
        ("data.synthetic_train=1000000000", "data.synthetic_train: must be <= 200,000"),
        ("train.batch_size=99999999999", "train.batch_size: must be <= 1,048,576"),
        ("model.widths=[66,132,100000]", "model.widths: every entry must be within 1..4096"),
    ],
)
def test_numbers_are_range_checked_naming_the_key(override, fragment):
    assert fragment in _one_line_exit_2("config", override)
    assert load_config(None, ["run.seed=9223372036854775807"]).run.seed == 2**63 - 1


def test_a_model_and_a_key_are_each_added_in_one_place(monkeypatch):
    """A toy model registered once (config.registry) and a toy key declared once (a field of a
    section class): the validation accepts and checks them, the reference lists them, `cifar-dist
    config` prints them, and the model is built by its name."""
    from dataclasses import dataclass

    import torch

    from cifar_dist.config import schema
    from cifar_dist.config.reference import reference_markdown
    from cifar_dist.config.registry import MODELS
    from cifar_dist.model.resnet import build_model

    def toy(model_cfg, num_classes, norm):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, num_classes))

    @dataclass
    class ToyTrain(schema.TrainConfig):
        warmup_steps: int = schema._f(0, "toy: a warm-up in steps", min=0, max=100)

    MODELS["toy"] = toy
    try:
        monkeypatch.setitem(schema.SECTION_CLASSES, "train", ToyTrain)
        res = cli_here("config", "model.name=toy", "train.warmup_steps=7")
        assert res.returncode == 0, res.stderr
        printed = yaml.safe_load(res.stdout)
        assert printed["model"]["name"] == "toy" and printed["train"]["warmup_steps"] == 7
        for override, fragment in (
            ("train.warmup_steps=x", "train.warmup_steps: expected an integer"),
            ("train.warmup_steps=1000", "train.warmup_steps: must be <= 100"),
            (
                "model.name=toys",
                "model.name: must be one of seed_resnet, resnet9, resnet18, airbench94, toy or package.module:factory",
            ),
        ):
            res = cli_here("config", override)
            assert res.returncode == 2 and fragment in res.stderr, (override, res.stderr)
        reference = reference_markdown()
        assert "| `train.warmup_steps` | `0` | toy: a warm-up in steps |" in reference
        assert "(seed_resnet / resnet9 / resnet18 / airbench94 / toy / package.module:name)" in reference
        model = build_model(load_config(None, ["model.name=toy"]).model)
        assert isinstance(model[1], torch.nn.Linear) and model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    finally:
        del MODELS["toy"]
    assert "toy" not in MODELS and cli_here("config", "model.name=toy").returncode == 2


def test_a_group_key_is_off_by_default_and_turned_on_by_a_mapping_or_one_of_its_keys(tmp_path):
    assert load_config(None).train.ema is None and load_config(None).run.profile is None
    from_file = load_config(write(tmp_path, "train:\n  ema: {decay: 0.99}\n"))
    assert (from_file.train.ema.decay, from_file.train.ema.every_steps) == (0.99, 1)  # the rest: defaults
    one_key = load_config(None, ["train.ema.warmup_steps=10"])
    assert (one_key.train.ema.decay, one_key.train.ema.warmup_steps) == (0.999, 10)
    assert load_config(None, ["run.profile=true"]).run.profile.steps == 3
    on_in_file = write(tmp_path, "train:\n  ema: {decay: 0.9}\n", "on.yaml")
    assert load_config(on_in_file, ["train.ema=null"]).train.ema is None  # the command line turns it off
    # the saved config of a run reads back the same
    saved = write(tmp_path, yaml.safe_dump(one_key.to_dict()), "saved.yaml")
    assert load_config(saved).train.ema == one_key.train.ema


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.ema.decay=1", "train.ema.decay: must be < 1, got 1.0"),
        ("train.ema.decay=0", "train.ema.decay: must be > 0, got 0.0"),
        ("train.ema.decay=-0.5", "train.ema.decay: must be > 0"),
        ("train.ema.beta=0.9", "unknown key 'train.ema.beta' (keys: decay, every_steps, warmup_steps)"),
        ("train.ema=3", "train.ema: expected a mapping of keys, true or null, got 3"),
        ("train.ema={every_steps: 0}", "train.ema.every_steps: must be >= 1, got 0"),
        ("eval.tta=flip_rotate", "eval.tta: must be one of none, flip, flip_translate, got 'flip_rotate'"),
        ("train.no_decay=[norm, bn]", "train.no_decay: must be one of norm, bias, got 'bn'"),
        ("train.lookahead.alpha=0", "train.lookahead.alpha: must be > 0"),
        ("run.profile.steps=0", "run.profile.steps: must be >= 1"),
        ("train.lr.max=1", "unknown key 'train.lr.max'"),
        ("run.tensorboard=false", "run.tensorboard is now run.trackers"),
        ("eval.use_ema=true", "eval.use_ema: needs train.ema"),
    ],
)
def test_bad_group_and_choice_values_exit_2_in_one_line(override, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_eval_tta_keeps_true_and_false_as_aliases():
    assert load_config(None, ["eval.tta=true"]).eval.tta == "flip"
    assert load_config(None, ["eval.tta=false"]).eval.tta == "none"
    assert load_config(None, ["eval.tta=flip_translate"]).eval.tta == "flip_translate"


def test_the_collective_timeout_is_a_key_that_reaches_the_process_group():
    """run.collective_timeout_s (600 s unless set) is the timeout the Accelerator's process group
    is started with; it is result-free (a resume may change it)."""
    from datetime import timedelta

    from cifar_dist.config.schema import result_free_keys
    from cifar_dist.distributed.accelerator import make_accelerator

    assert load_config(SMOKE, []).run.collective_timeout_s == 600
    accelerator = make_accelerator(load_config(SMOKE, ["run.collective_timeout_s=42"]))
    assert accelerator.init_handler.timeout == timedelta(seconds=42)
    assert "run.collective_timeout_s" in result_free_keys()
    with pytest.raises(ConfigError, match="run.collective_timeout_s"):
        load_config(SMOKE, ["run.collective_timeout_s=0"])
