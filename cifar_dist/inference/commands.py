"""`cifar-dist predict` and `cifar-dist export`: their arguments and what they do (docs/runs.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cifar_dist.data.tta import VIEWS
from cifar_dist.errors import UserError, say

WEIGHTS_HELP = (
    "a run directory (the weights it evaluated: its EMA under eval.use_ema), a checkpoint directory, "
    "a .safetensors file beside its run's config.yaml, or a shared-model folder (export --format hub)"
)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: a whole number of at least 1")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", metavar="RUN", help=WEIGHTS_HELP)
    p.add_argument("--trust-code", action="store_true", help="allow the run's config to import its own model code")


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="PNG, JPEG, ... files, or folders of them")
    p.add_argument("--top-k", type=_positive, default=3, help="classes shown per image (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout, for programs")
    p.add_argument("--tta", choices=list(VIEWS), default="none", help="test-time augmentation, as eval.tta")
    p.add_argument("--batch-size", type=_positive, default=256, help="images per forward pass")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: a GPU when there is one)")


def run_predict(args) -> int:
    import torch

    from cifar_dist.inference.predict import TrainedModel, predict_files

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    trained = TrainedModel.load(args.weights, device, args.trust_code)
    rows, problems, seconds = predict_files(trained, args.images, args.tta, args.batch_size, args.top_k)
    for line in problems:
        say(f"cifar-dist: {line}")
    if not rows:
        raise UserError(f"no image could be predicted ({len(problems)} paths skipped)")
    if args.json:
        doc = {
            "weights": trained.what,
            "tta": args.tta,
            "predictions": [
                {"file": str(path), "top_k": [{"class": c, "probability": p} for c, p in top]} for path, top in rows
            ],
            "skipped": problems,
        }
        print(json.dumps(doc, indent=1))
    else:
        for path, top in rows:
            print(f"{path}: " + ", ".join(f"{c} {100 * p:.1f}%" for c, p in top))
        say(f"{len(rows)} images in {seconds:.2f} s ({len(rows) / max(seconds, 1e-9):,.0f} img/s on {device})")
    return 0


FORMAT_HELP = (
    "onnx (checked with onnxruntime: pip install 'cifar_dist[export]'), torchscript (BatchNorm folded), "
    "exported_program (torch.export), or hub: a folder in the Hugging Face Hub's layout with a model card"
)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    from cifar_dist.inference.export import FORMATS

    _common(p)
    p.add_argument("--format", required=True, choices=[*FORMATS, "hub"], help=FORMAT_HELP)
    p.add_argument("--out", help="the file (a folder for hub); default RUN/export/model.<suffix> (RUN/hub)")
    p.add_argument(
        "--batch-size", type=_positive, help="a fixed batch dimension (default: dynamic, any batch from 1 to 4096)"
    )
    p.add_argument("--check-images", type=_positive, help="check on the first N evaluation images (default: all)")


def run_export(args) -> int:
    from cifar_dist.inference.export import FORMATS, export
    from cifar_dist.inference.hub import save_for_hub
    from cifar_dist.inference.predict import TrainedModel

    trained = TrainedModel.load(args.weights, "cpu", args.trust_code)
    source = Path(args.weights)
    run_dir = source if (source / "summary.json").is_file() else None
    if args.format == "hub":
        out = Path(args.out) if args.out else source / "hub"
        print(f"{trained.what} of {source} -> {save_for_hub(trained, run_dir, out)}")
        return 0
    folder = source if source.is_dir() else source.parent
    out = Path(args.out) if args.out else folder / "export" / f"model{FORMATS[args.format]}"
    record = export(trained, args.format, out, args.batch_size, args.check_images)
    print(
        f"{out}: {args.format}, batch {record['batch']}; checked on {record['images']:,} {record['eval_set']} images: "
        f"max |logit difference| {record['max_abs_diff']:.2e} (at most {record['tolerance']:g}), accuracy "
        f"{100 * record['accuracy_export']:.2f}% as PyTorch's; {out.name}.check.json beside it"
    )
    return 0
