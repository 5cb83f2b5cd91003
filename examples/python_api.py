"""cifar_dist from Python, as in a notebook: train, predict on image files, export, share.

    CIFAR_DIST_DATA=~/.cache/cifar_dist python examples/python_api.py runs/api-example [CONFIG]

Each step is one cell of a notebook; with the CPU demo (the default CONFIG) the whole takes
about two minutes on 2 CPU cores.
"""

import sys
from pathlib import Path

import torch
from PIL import Image

import cifar_dist
from cifar_dist.data import CLASSES, build_datasets

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/api-example")
config = sys.argv[2] if len(sys.argv) > 2 else "configs/cpu_quick.yaml"

# 1. Train for one epoch (the same bits as `cifar-dist train`); run it twice and
#    the second call starts as cleanly as the first.
result = cifar_dist.train(config, ["train.epochs=1", "run.progress=false"], out / "run", overwrite=True)
print(f"test accuracy {100 * result.summary['test_acc']:.2f}% after {result.summary['epochs']} epoch")

# 2. Predict: a few test images written as PNG files, then the same images as an array.
trained = cifar_dist.TrainedModel.load(result.run_dir)
_, test_set, _ = build_datasets(trained.cfg)
files = []
for i in range(6):
    files.append(out / f"test_{i}.png")
    Image.fromarray(test_set.images[i].permute(1, 2, 0).numpy()).save(files[-1])
probs = cifar_dist.predict(trained, files)
for path, p, label in zip(files, probs, test_set.labels):
    print(f"{path.name}: {CLASSES[int(p.argmax())]} ({100 * float(p.max()):.0f}%), truly {CLASSES[int(label)]}")
assert torch.equal(probs, cifar_dist.predict(trained, test_set.images[:6]))  # PNG is lossless

# 3. Export to ONNX (checked against PyTorch on the test set before it is kept) and a shared
#    folder in the Hugging Face Hub's layout, then load the folder back.
from cifar_dist.errors import UserError  # noqa: E402
from cifar_dist.inference.export import export  # noqa: E402
from cifar_dist.inference.hub import save_for_hub  # noqa: E402

try:
    check = export(trained, "onnx", out / "model.onnx", limit=1000)
    print(f"model.onnx: logits within {check['max_abs_diff']:.1e} of PyTorch's on {check['images']} images")
except UserError as e:  # onnxruntime not installed: pip install 'cifar_dist[export]'
    print(e)
folder = save_for_hub(trained, result.run_dir, out / "shared")
shared = cifar_dist.CifarClassifier.from_pretrained(folder)
pixels = test_set.images[:6].float()  # the shared model takes pixel values 0-255
print("shared folder agrees:", torch.equal(shared(pixels).argmax(1), probs.argmax(1)))
