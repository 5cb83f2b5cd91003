"""The `cifar-dist` command: train, sweep, compare, eval, summary, prepare, report, bench, config, doctor.

`key=value` config overrides may come before, between or after the options."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import cifar_dist
from cifar_dist.config.loading import load_config, resolve_data_root
from cifar_dist.config.numbers import OneLineParser
from cifar_dist.config.overrides import parse_with_overrides
from cifar_dist.config.plugins import require_trust
from cifar_dist.config.schema import EvalConfig, choices, new_config
from cifar_dist.distributed.launcher import rank_prefix
from cifar_dist.errors import CheckpointError, ConfigError, guarded
from cifar_dist.runtime.malloc import tune_malloc
from cifar_dist.storage.files import own_folder, write_json_atomic
from cifar_dist.train import add_train_arguments


def _summary(args):
    from cifar_dist.model.layer_table import count_flops, format_table, layer_table
    from cifar_dist.model.resnet import build_model, count_parameters

    cfg = load_config(args.config, args.overrides)
    named_here = any(o.startswith("model.name=") for o in args.overrides)  # typed by the user: trusted
    require_trust(cfg.model.name, args.config, args.trust_code or named_here)
    model = build_model(cfg.model)
    print(format_table(layer_table(model)))
    total = count_parameters(model)
    fwd = count_flops(model)
    print("=" * 66)
    print(f"Total params: {total:,}")
    print(f"Trainable params: {total:,}")
    print(f"Forward: {fwd / 2e9:.3f} GMAC ({fwd / 1e9:.3f} GFLOP) per 32x32 image")
    return 0


def _prepare(args):
    from cifar_dist.data.prepare import prepare

    cfg = new_config()
    if args.root:
        cfg.data.root = args.root
    root = resolve_data_root(cfg)
    built = False
    if args.from_archive:
        from cifar_dist.data.jpeg_archive import unpack_jpeg_archive

        built = unpack_jpeg_archive(args.from_archive, root)
    line = prepare(root, download=not (args.no_download or args.from_archive), quiet=args.quiet and not built)
    if line:
        print(line)
    if args.beton:
        from cifar_dist.data.beton import write_betons

        print(write_betons(root))
    return 0


def _report(args):
    from cifar_dist.storage.plots import draw_run

    for path in draw_run(Path(args.run_dir)):
        print(path)
    return 0


def _eval(args):
    import torch

    from cifar_dist.data import build_datasets
    from cifar_dist.inference.evaluate import evaluate_model
    from cifar_dist.model.resnet import build_model
    from cifar_dist.storage.checkpoint import evaluated_weights, load_weights, locate_weights
    from cifar_dist.storage.plots import plot_confusion

    asked = _eval_overrides(args.overrides)
    weights, config, what = locate_weights(Path(args.checkpoint))
    if not config.is_file():
        raise CheckpointError(f"{config}: missing; eval needs the run's config.yaml")
    saved = load_config(config)
    cfg = load_config(config, args.overrides)  # the run's own config; overrides such as data.root on top
    require_trust(cfg.model.name, config, args.trust_code)
    use_ema = cfg.eval.use_ema if "eval.use_ema" in asked else None
    weights, what = evaluated_weights(weights, what, saved, named=Path(args.checkpoint).is_file(), use_ema=use_ema)
    if "eval.tta" in asked and args.tta and args.tta != cfg.eval.tta:
        raise ConfigError(f"--tta {args.tta} and eval.tta={cfg.eval.tta} disagree; give one of them")
    run_dir = config.parent
    print(f"evaluating {what} of {run_dir}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model)
    load_weights(weights, model)
    model = model.to(device).eval()
    _, eval_set, name = build_datasets(cfg)
    tta = args.tta or (cfg.eval.tta if "eval.tta" in asked else "none")
    result = evaluate_model(model, eval_set, cfg, device, tta=tta)
    views = "" if tta == "none" else f" ({tta} TTA: {result['views']} views)"
    print(f"{name} accuracy {100 * result['acc']:.2f}% on {result['count']} images{views}, loss {result['loss']:.4f}")
    for cls, acc in result["per_class_acc"].items():
        print(f"  {cls:>10}: {100 * acc:.2f}%")
    tag = "" if weights.parent == run_dir else f"-{weights.parent.name}"
    if use_ema is not None:  # the weights asked for: eval-ema.json, eval-step_N-training.json
        tag += "-ema" if use_ema else "-training"
    suffix = {"none": "", "flip": "_tta"}.get(tta, f"_tta_{tta}")  # eval_tta.json: flip, as before the modes
    out = run_dir / f"eval{tag}{suffix}.json"
    write_json_atomic(out, {"weights": str(weights), **result})
    own_folder(run_dir / "plots")
    plot_confusion(
        result["confusion"],
        run_dir / "plots" / f"confusion_matrix_eval{tag}.png",
        title=f"confusion matrix ({what}): {run_dir.name}",
    )
    print(f"written {out}")
    return 0


# What an evaluation of saved weights takes from the command line: the data (where the images
# are, which ones, how they are read), the test-time augmentation, which weights (EMA or the
# training weights), the memory layout. Any other key would change nothing it computes.
EVAL_KEYS = ("data.", "eval.tta", "eval.use_ema", "run.channels_last")


def _eval_overrides(overrides) -> set:
    """The keys of ``eval``'s overrides; one that eval would ignore is refused in one line."""
    keys = {item.split("=", 1)[0].strip() for item in overrides or []}
    for key in sorted(keys):
        if not (key.startswith(EVAL_KEYS[0]) or key in EVAL_KEYS[1:]):
            raise ConfigError(
                f"{key}: eval evaluates the run's saved weights with its config, and this key would change "
                "nothing it computes (it takes data.*, eval.tta, eval.use_ema and run.channels_last)"
            )
    return keys


def _config(args):
    import yaml

    from cifar_dist.config.reference import reference_markdown

    if args.reference:
        print(reference_markdown(), end="")
        return 0
    print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
    return 0


def _doctor(args):
    from cifar_dist.cli.doctor import report

    print(report(args.config))
    return 0


def _command(sub, name: str, help: str, add_arguments, handler: str) -> None:
    """A subcommand whose arguments and handler (``"module:function"``, imported when it runs) live elsewhere."""
    p = sub.add_parser(name, help=help)
    add_arguments(p)
    module, function = handler.split(":")
    p.set_defaults(fn=lambda args: getattr(importlib.import_module(module), function)(args))


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="cifar-dist", description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", action="version", version=f"cifar-dist {cifar_dist.__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    from cifar_dist.bench.args import add_bench_arguments
    from cifar_dist.experiments.compare import add_compare_arguments
    from cifar_dist.experiments.sweep import add_sweep_arguments
    from cifar_dist.experiments.tune import add_tune_arguments
    from cifar_dist.inference.commands import add_export_arguments, add_predict_arguments

    _command(
        sub, "train", "train a model (same as python -m cifar_dist.train)", add_train_arguments, "cifar_dist.train:run"
    )
    _command(
        sub,
        "sweep",
        "many seeds and settings as independent runs (locally, or a Slurm array)",
        add_sweep_arguments,
        "cifar_dist.experiments.sweep:run_sweep",
    )
    _command(
        sub,
        "tune",
        "search settings with Optuna: pruned, resumable trials shared by many workers",
        add_tune_arguments,
        "cifar_dist.experiments.tune:run_tune",
    )
    _command(
        sub,
        "compare",
        "runs or sweeps side by side: mean ± std, 95%% CI, Welch's t-test",
        add_compare_arguments,
        "cifar_dist.experiments.compare:run_compare",
    )

    p = sub.add_parser("eval", help="evaluate a run's weights: final, or its newest or a given checkpoint")
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a run directory (its final weights, else its newest checkpoint), a checkpoint directory "
        "(RUN/checkpoints/step_N) or a .safetensors file; the run's config.yaml is used",
    )
    p.add_argument(
        "--tta",
        nargs="?",
        const="flip",
        choices=choices(EvalConfig, EvalConfig.__dataclass_fields__["tta"]),
        help="test-time augmentation (as eval.tta): flip averages the logits of the image and its mirror "
        "(bare --tta), flip_translate of those and their one-pixel shifts (6 views)",
    )
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="allow the run's config to import its own model code (model.name: package.module:factory)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=/data")
    p.set_defaults(fn=_eval)

    _command(
        sub,
        "predict",
        "classify image files with a trained model: top-k classes with probabilities",
        add_predict_arguments,
        "cifar_dist.inference.commands:run_predict",
    )
    _command(
        sub,
        "export",
        "export a trained model (ONNX, TorchScript, ExportedProgram) checked against PyTorch, or share it",
        add_export_arguments,
        "cifar_dist.inference.commands:run_export",
    )

    p = sub.add_parser("summary", help="per-layer table (the paper's Figure 1), parameters, FLOPs")
    p.add_argument("--config")
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="allow the config file to import its model code (model.name: package.module:factory)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=_summary)

    p = sub.add_parser("prepare", help="download or check CIFAR-10; --beton writes FFCV files")
    p.add_argument("--root", help="data directory (default: $CIFAR_DIST_DATA, else ~/.cache/cifar_dist)")
    p.add_argument("--beton", action="store_true", help="also write train/test .beton files for data.loader=ffcv")
    p.add_argument("--no-download", action="store_true", help="only check what is there")
    p.add_argument("--quiet", action="store_true", help="say nothing when the data was already complete and readable")
    p.add_argument(
        "--from-archive",
        metavar="TAR_GZ",
        help="build it from a CIFAR-10 JPEG archive (cifar10-jpeg.tar.gz: lossy, exact labels)",
    )
    p.set_defaults(fn=_prepare)

    p = sub.add_parser("report", help="(re)draw a run's plots")
    p.add_argument("run_dir")
    p.set_defaults(fn=_report)

    p = sub.add_parser("config", help="print the resolved config")
    p.add_argument("--config")
    p.add_argument("--reference", action="store_true", help="print every key with its default and meaning (Markdown)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=_config)

    _command(
        sub,
        "bench",
        "throughput benchmark: images/s per device, MFU, speed-up over plain PyTorch",
        add_bench_arguments,
        "cifar_dist.bench.run:run_bench",
    )

    p = sub.add_parser(
        "doctor", help="versions, devices, data, Slurm, accelerate's and torch's environment: for a bug report"
    )
    p.add_argument("--config", help="the recipe whose data location to check (default: the built-in defaults)")
    p.set_defaults(fn=_doctor)
    return ap


def _bare_tta(argv: list[str]) -> list[str]:
    """``eval --tta key=value``: the bare flag (flip) and an override after it, which argparse
    would otherwise read as the flag's mode."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--tta" and i + 1 < len(argv) and "=" in argv[i + 1]:
            out.append("flip")
    return out


def main(argv=None) -> int:
    tune_malloc()
    args = parse_with_overrides(build_parser(), _bare_tta(sys.argv[1:] if argv is None else list(argv)))
    return guarded(args.fn, args, rank_prefix)


if __name__ == "__main__":
    sys.exit(main())
