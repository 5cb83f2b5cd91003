"""The pictures of a run: titles that name it, whole epochs, the LR schedule beside the accuracy."""

from __future__ import annotations

import json
import shutil

import pytest

from cifar_dist.config.loading import load_config
from cifar_dist.model.optim import lr_at
from cifar_dist.storage.plots import draw_run, epoch_axis, lr_schedule, pyplot

from conftest import SMOKE


def test_a_short_run_gets_whole_epochs_and_room_around_them():
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([1], [0.5])
    epoch_axis(ax, [1])
    assert ax.get_xlim() == (0.5, 1.5)
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())
    plt.close(fig)


def test_the_schedule_drawn_is_the_one_trained():
    cfg = load_config(SMOKE)  # 4,096 images at batch 64: 64 steps per epoch, 2 epochs, one-cycle
    epochs, rates = lr_schedule(cfg)
    assert epochs[0] == pytest.approx(1 / 64) and epochs[-1] == pytest.approx(2.0)
    step = round(epochs[10] * 64) - 1
    assert rates[10] == lr_at(step, cfg.train, 64)
    assert max(rates) == pytest.approx(cfg.train.lr, rel=0.05)


def test_every_plot_names_its_run_and_recipe(tmp_path, monkeypatch):
    run = tmp_path / "my-run"
    run.mkdir()
    shutil.copy(SMOKE, run / "config.yaml")
    (run / "metrics.jsonl").write_text(
        json.dumps(
            {
                "epoch": 1,
                "step": 64,
                "train_loss": 2.0,
                "train_acc": 0.3,
                "test_loss": 1.9,
                "test_acc": 0.35,
                "lr": 0.1,
                "epoch_time_s": 1.0,
                "images_per_s": 10.0,
            }
        )
        + "\n"
    )
    titles = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "set_title",
        lambda self, text, *a, **k: (titles.append(text), original(self, text, *a, **k))[1],
    )
    made = draw_run(run)
    assert [p.name for p in made] == ["loss.png", "accuracy.png"]
    assert titles == ["loss: my-run (config, seed_resnet)", "accuracy and learning rate: my-run (config, seed_resnet)"]
