"""The extension points: callbacks (run.callbacks) and user models (model.name = module:factory),
from modules outside the package, under one and several processes."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import yaml

from conftest import BIN, REPO, SMOKE, base_env, cli_here, free_port, run, summary
from helpers import build, fit

USER_CODE = '''
import json, os
import torch.nn as nn
from cifar_dist import Callback


class StopAtStep(Callback):
    """Stops the run after step 6 (steps are counted from 1); records every hook it saw, per rank."""

    def on_train_start(self, run):
        self.run, self.seen = run, []

    def on_step_end(self, step, metrics):
        self.seen.append(("step", step, metrics["lr"]))
        if step == 6:
            self.run.request_stop()

    def on_epoch_end(self, row):
        self.seen.append(("epoch", row["step"], row.get("test_acc")))

    def on_train_end(self, summary):
        self.seen.append(("end", summary["steps"], summary["test_acc"]))
        path = os.path.join(str(self.run.run_dir), f"hooks-rank{self.run.rank}.json")
        with open(path, "w") as f:
            json.dump(self.seen, f)


def tiny_net(model_cfg, num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


def not_a_model(model_cfg, num_classes):
    return "a string"
'''
QUICK = [
    "train.max_steps=8",
    "data.synthetic_train=512",
    "data.synthetic_test=256",
    "run.progress=false",
    "run.plots=false",
]


@pytest.fixture
def user_code(tmp_path):
    (tmp_path / "user_code.py").write_text(textwrap.dedent(USER_CODE))
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    sys.modules.pop("user_code", None)


def test_a_callback_stops_the_run_after_the_step_it_asks_at(tmp_path, user_code):
    from cifar_dist.trainer.callbacks import load_callbacks

    callbacks = load_callbacks(["user_code:StopAtStep"])
    trainer = build(tmp_path / "run", callbacks=callbacks.items)
    state = fit(trainer)
    seen = callbacks.items[0].seen
    assert state.global_step == 6 and [s for kind, s, _ in seen if kind == "step"] == list(range(1, 7))
    assert seen[-1][0] == "epoch" and seen[-1][1] == 6 and seen[-1][2] is not None  # evaluated like a last epoch
    assert (tmp_path / "run" / "checkpoints" / "step_00000006").is_dir()


def test_bad_callbacks_and_models_are_refused_in_one_line(tmp_path, user_code):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run")
    cases = {
        "run.callbacks=[nowhere.at_all:Hook]": "run.callbacks: cannot import 'nowhere.at_all'",
        "run.callbacks=[user_code:Missing]": "run.callbacks: 'user_code' has no 'Missing'",
        "run.callbacks=[no_colon]": "run.callbacks: 'no_colon' is not of the form package.module:Class",
        "model.name=user_code:not_a_model": "model.name: user_code:not_a_model returned str, not a torch.nn.Module",
        "model.name=resnet99": (
            "model.name: must be one of seed_resnet, resnet9, resnet18, airbench94 or package.module:factory"
        ),
    }
    for override, message in cases.items():
        res = cli_here("train", "--config", SMOKE, "--out", out, "--overwrite", override, *QUICK)
        assert res.returncode == 2, (override, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, (override, res.stderr)
    assert (out / "keep.txt").read_text() == "an earlier run"  # nothing of the earlier run was touched


def test_summary_describes_a_user_model(user_code):
    res = cli_here("summary", "model.name=user_code:tiny_net")
    assert res.returncode == 0 and "Total params: 314" in res.stdout, res.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_user_model_and_callback_train_on_one_and_two_processes(tmp_path, user_code):
    """One process (`python -m cifar_dist.train`, the module in the working directory) and
    two (`torchrun -m cifar_dist.train`, the module on PYTHONPATH): the user's network is
    trained, and the user's callback runs on every rank and stops both at the same step."""
    args = [
        "--config",
        SMOKE,
        "model.name=user_code:tiny_net",
        "run.callbacks=[user_code:StopAtStep]",
        "model.bn_group=0",
        "train.exact_reduce=false",
        *QUICK,
    ]
    run([sys.executable, "-m", "cifar_dist.train", "--out", tmp_path / "one", *args], cwd=user_code)
    run(
        [
            BIN / "torchrun",
            "--nproc_per_node",
            2,
            "--master_port",
            free_port(),
            "-m",
            "cifar_dist.train",
            "--out",
            tmp_path / "two",
            *args,
        ],
        env=base_env(PYTHONPATH=user_code),
    )
    for out, ranks in ((tmp_path / "one", 1), (tmp_path / "two", 2)):
        s = summary(out)
        assert s["parameters"] == 314 and s["steps"] == 6 and s["world_size"] == ranks
        hooks = [json.loads((out / f"hooks-rank{r}.json").read_text()) for r in range(ranks)]
        assert all(h == hooks[0] for h in hooks)  # every rank saw the same hooks and values
        assert [s for kind, s, _ in hooks[0] if kind == "step"] == list(range(1, 7))
        assert hooks[0][-1] == ["end", 6, s["test_acc"]]


def test_the_documented_example_stops_at_the_target_accuracy(tmp_path, monkeypatch):
    """examples/stop_at_accuracy.py, as docs/extending.md shows it: a target of 0 is
    reached by the first evaluation, so the two-epoch smoke run ends after epoch 1."""
    from cifar_dist.trainer.callbacks import load_callbacks

    monkeypatch.syspath_prepend(str(REPO / "examples"))
    monkeypatch.setenv("STOP_AT_ACCURACY", "0.0")
    state = fit(build(tmp_path / "run", callbacks=load_callbacks(["stop_at_accuracy:StopAtAccuracy"]).items))
    assert [r["epoch"] for r in state.history] == [1] and "test_acc" in state.history[0]


SHIPPED_CODE = """
import pathlib
pathlib.Path(__file__).with_name("imported").write_text("the module ran")

from cifar_dist import ModelConfig, build_model


def factory(model_cfg, num_classes):
    return build_model(ModelConfig(widths=[8, 16, 32], blocks=[1, 1, 1]), num_classes)
"""


def test_code_named_in_a_received_run_directory_runs_only_when_the_user_trusts_it(tmp_path, monkeypatch):
    """A run directory that names its own module in model.name and ships that module, on the
    path: eval, summary and load_model refuse without --trust-code / trust_code=True and import
    nothing; with it they work. report and compare read a run without importing anything."""
    import cifar_dist
    from cifar_dist.storage.checkpoint import save_weights

    received = tmp_path / "received"
    received.mkdir()
    (received / "shipped_model.py").write_text(textwrap.dedent(SHIPPED_CODE))
    monkeypatch.syspath_prepend(str(received))
    config = yaml.safe_load(SMOKE.read_text())
    config["model"]["name"] = "shipped_model:factory"
    (received / "config.yaml").write_text(yaml.safe_dump(config))
    (received / "metrics.jsonl").write_text(
        json.dumps(
            {
                "epoch": 1,
                "step": 1,
                "train_loss": 2.0,
                "train_acc": 0.1,
                "lr": 0.1,
                "epoch_time_s": 1.0,
                "images_per_s": 1.0,
            }
        )
        + "\n"
    )
    refusal = (
        f"cifar-dist: {received / 'config.yaml'}: model.name 'shipped_model:factory' would import and run "
        "module 'shipped_model'; pass --trust-code (load_model(..., trust_code=True)) if you trust it"
    )
    from cifar_dist.config.schema import ModelConfig
    from cifar_dist.model.resnet import build_model

    save_weights(build_model(ModelConfig(widths=[8, 16, 32], blocks=[1, 1, 1])), received / "model.safetensors")

    for command in (["eval", "--checkpoint", received], ["summary", "--config", received / "config.yaml"]):
        res = cli_here(*command)
        assert res.returncode == 2 and res.stderr.strip() == refusal, res.stderr
    with pytest.raises(Exception, match="pass --trust-code"):
        cifar_dist.load_model(received)
    assert cli_here("report", received).returncode == 0
    assert not (received / "imported").exists()  # nothing of the directory's code ran

    assert cifar_dist.load_model(received, trust_code=True) is not None
    assert (received / "imported").read_text() == "the module ran"
    res = cli_here("eval", "--checkpoint", received, "--trust-code")
    assert res.returncode == 0 and "on 1024 images" in res.stdout, res.stderr
    sys.modules.pop("shipped_model", None)
