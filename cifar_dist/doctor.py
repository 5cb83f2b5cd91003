"""`cifar-dist doctor`: what this machine offers cifar_dist, the first thing to paste into a bug report."""
from __future__ import annotations

import platform
import shutil
import sys
from importlib import metadata


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[tuple[str, str]]:
    import torch

    rows = [("CUDA available", f"yes, CUDA {torch.version.cuda}" if torch.cuda.is_available() else "no")]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        cc = (p.major, p.minor)
        rows.append((f"GPU {i}", f"{p.name}, compute capability {p.major}.{p.minor}, "
                                 f"{p.total_memory / 2**30:.0f} GiB, bf16 {'yes' if cc >= (8, 0) else 'no (slow)'}, "
                                 f"TF32 {'yes' if cc >= (8, 0) else 'no'}"))
    cpu_bf16 = getattr(torch.backends, "mkldnn", None)
    bf16 = "yes" if cpu_bf16 is not None and cpu_bf16.is_available() and _cpu_has_bf16() else "no"
    rows.append(("CPU", f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                        f"bf16 units {bf16}"))
    return rows


def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _data(config: str | None) -> tuple[str, str]:
    from cifar_dist.config import load_config, resolve_data_root
    from cifar_dist.data.cifar import FOLDER, MD5, file_digest

    cfg = load_config(config)
    if cfg.data.synthetic:
        return "CIFAR-10", "synthetic (data.synthetic: true): no files needed"
    folder = resolve_data_root(cfg) / FOLDER
    missing = [n for n in MD5 if not (folder / n).is_file()]
    if missing:
        return "CIFAR-10", f"missing in {folder} ({len(missing)} files); run `cifar-dist prepare`"
    differ = [n for n in MD5 if file_digest(folder / n, "md5") != MD5[n]]
    kind = "the official files" if not differ else "a rebuilt or modified copy (md5 differs from the official)"
    return "CIFAR-10", f"{folder}: {kind}"


def doctor(config: str | None = None) -> list[tuple[str, str]]:
    import cifar_dist

    rows = [("cifar_dist", cifar_dist.__version__), ("python", sys.version.split()[0]),
            ("platform", platform.platform())]
    rows += [(name, _version(name)) for name in ("torch", "accelerate", "deepspeed", "ffcv", "torchvision", "numpy")]
    rows += _devices()
    rows.append(_data(config))
    slurm = {cmd: shutil.which(cmd) for cmd in ("sbatch", "srun", "scontrol")}
    rows.append(("Slurm", ", ".join(f"{c} {'yes' if p else 'no'}" for c, p in slurm.items())))
    return rows


def format_rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
