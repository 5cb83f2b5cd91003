"""Train a CIFAR-10 classifier; the same file under every launcher.

    cifar-dist train --config configs/seed.yaml                      # one process (CPU or one GPU)
    python cifar_dist/train.py --config configs/seed.yaml            # the same
    accelerate launch --config_file launch/multi_gpu.yaml --num_processes 8 \\
        cifar_dist/train.py --config configs/seed.yaml               # 8 GPUs
    accelerate launch --config_file launch/cpu.yaml --num_processes 2 cifar_dist/train.py --config configs/smoke.yaml
    torchrun --nproc_per_node 4 cifar_dist/train.py --config configs/fast.yaml
    sbatch --nodes 2 slurm/train.sh configs/fast.yaml

``train.batch_size`` is the global batch: N processes each take 1/N of it.
With ``run.seed`` and ``model.bn_group`` set, any number of processes computes
the same run (up to float summation order); ``--resume`` continues it exactly.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python cifar_dist/train.py`
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import json
import os
import time
import warnings

from cifar_dist.errors import EnvironmentFault, TrainingFault, UserError, fail, rank_prefix, say


def add_train_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", help="YAML recipe (configs/*.yaml); defaults are the paper's recipe")
    ap.add_argument("--out", help="run directory (overrides run.out_dir)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest complete checkpoint in the run directory (a fresh start if none)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.01")


def _progress_factory(enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm
            return lambda **kw: tqdm(unit="step", mininterval=1.0, dynamic_ncols=True, leave=False, **kw)
        except ImportError:
            pass

    class _Silent:
        def __init__(self, **kw):
            pass

        def update(self, n=1):
            pass

        def set_postfix(self, **kw):
            pass

        def close(self):
            pass
    return _Silent


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say; returns the exit code. Raises UserError for bad input."""
    from cifar_dist.config import load_config, save_config

    cfg = load_config(args.config, args.overrides)  # before the heavy imports: bad input fails fast

    import torch

    from cifar_dist import engine, report
    from cifar_dist.checkpoint import save_weights
    from cifar_dist.distributed import barrier, make_accelerator, print0, share_from_main, world_info
    from cifar_dist.metrics import MetricsLog
    from cifar_dist.models import count_parameters
    from cifar_dist.repro import apply_tf32, device_name, git_sha, set_determinism, versions
    from cifar_dist.rundir import RunDir, default_run_dir

    if args.out:
        cfg.run.out_dir = args.out
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    resolve_run_precision(cfg)
    set_determinism(cfg.run.deterministic, compiling=cfg.run.compile)
    apply_tf32(cfg.run)
    started = time.time()

    accelerator = make_accelerator(cfg)
    rank, world = world_info()
    shard, train_set, eval_set, eval_name = build_data(cfg, accelerator)

    run_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else None
    if run_dir is None:  # every rank must agree on the generated name
        run_dir = share_from_main(lambda: default_run_dir(cfg.name))
    cfg.run.out_dir = str(run_dir)
    rundir = RunDir(run_dir)
    ckpt = share_from_main(lambda: rundir.open(cfg.to_dict(), args.resume, args.overwrite))
    barrier()

    parts = build_parts(cfg, accelerator, shard, train_set, eval_set, run_dir,
                        fault=engine.parse_fault(os.environ.get(engine.FAULT_VAR)))
    model = parts.model
    state = engine.TrainState()
    if ckpt is not None:
        state = restore(parts, ckpt)
        print0(f"resuming from {ckpt} (epoch {state.epoch + 1}, step {state.global_step})")
    elif args.resume:
        print0(f"{run_dir}: no checkpoint yet, starting from the beginning")

    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
        parts.metrics = MetricsLog(run_dir, cfg.run.tensorboard, state.history)
        (run_dir / "STOP").unlink(missing_ok=True)
    spe = parts.loader.steps_per_epoch
    print0(f"{cfg.name}: {cfg.model.name} ({count_parameters(model):,} parameters) on {world} x "
           f"{accelerator.device.type} [{accelerator.distributed_type.value}], {cfg.run.precision}"
           f"{', compiled' if cfg.run.compile else ''}{', channels_last' if cfg.run.channels_last else ''}")
    print0(f"batch {cfg.train.batch_size} global = {world} x {shard.per_process} per process "
           f"= {world} x {cfg.train.accum_steps} x {shard.micro} micro; {spe} steps/epoch, "
           f"{len(train_set):,} train / {len(eval_set):,} {eval_name} images; run dir {run_dir}")

    try:
        state = engine.fit(parts, state, _progress_factory(cfg.run.progress and rank == 0))
    except engine.Preempted as e:
        print0(f"stopped by {e} at step {state.global_step}; checkpoint written, resume with --resume")
        _after_preemption(run_dir, rank)
        return 0

    final = parts.last_eval if (parts.last_eval and not cfg.eval.tta) else engine.evaluate(parts, tta=cfg.eval.tta)
    wall = time.time() - started
    if rank == 0:
        save_weights(model, run_dir / "model.safetensors")
        history = state.history
        train_time = sum(r["epoch_time_s"] for r in history)
        images = sum(r["images_per_s"] * r["epoch_time_s"] for r in history)
        ips = images / train_time if train_time else 0.0
        summary = {
            "test_acc": final["acc"], "test_loss": final["loss"], "eval_set": eval_name,
            "eval_images": final["count"], "tta": cfg.eval.tta, "per_class_acc": final["per_class_acc"],
            "epochs": state.epoch, "steps": state.global_step, "world_size": world,
            "wall_time_s": wall, "train_time_s": train_time,
            "images_per_s": ips, "images_per_s_per_device": ips / world,
            "skipped_steps": state.skipped_steps, "parameters": count_parameters(model),
            "compiled_graphs": engine.graph_count() if cfg.run.compile else None,
            "recompiles_after_warmup": (engine.graph_count() - parts.graphs_after_warmup
                                        if cfg.run.compile and parts.graphs_after_warmup is not None else None),
            "precision": cfg.run.precision, "seed": cfg.run.seed, "config": cfg.name, "git_sha": git_sha(),
            "versions": versions(),
            "device": device_name(accelerator.device),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        (run_dir / "confusion_matrix.json").write_text(json.dumps(
            {"classes": list(report.CLASSES), "rows_true_cols_pred": final["confusion"]}))
        if cfg.run.plots:
            report.draw_run(run_dir)
        parts.metrics.close()
        print0(f"{eval_name} accuracy {100 * final['acc']:.2f}% ({final['count']} images"
               f"{', flip TTA' if cfg.eval.tta else ''}); {wall:.1f} s; results in {run_dir}")
    barrier()
    rundir.close()
    accelerator.end_training()
    return 0


def resolve_run_precision(cfg) -> None:
    """Replace ``run.precision: auto`` by what this process's device runs best (config.yaml
    then records it); warn once about bf16 on a GPU without bf16 tensor cores."""
    from cifar_dist.distributed import env_rank
    from cifar_dist.errors import ConfigError
    from cifar_dist.precision import gpu_capability, resolve_precision

    requested = cfg.run.precision
    cfg.run.precision, warning = resolve_precision(requested, gpu_capability())
    if warning and env_rank() == 0:
        say(f"cifar-dist: warning: {warning}")
    if cfg.run.precision == "fp16" and cfg.train.exact_reduce:
        raise ConfigError(f"train.exact_reduce: not with run.precision=fp16 (loss scaling; run.precision="
                          f"{requested} chose fp16 on this GPU); set run.precision=fp32 or bf16")


def build_data(cfg, accelerator):
    """This process's share of the global batch and the datasets: (shard, train, eval, eval name)."""
    from cifar_dist.data import Shard, build_datasets
    from cifar_dist.distributed import configure_deepspeed, world_info

    rank, world = world_info()
    shard = Shard(rank, world, cfg.train.batch_size, cfg.train.accum_steps)
    if cfg.model.bn_group and shard.micro % cfg.model.bn_group:
        raise UserError(f"model.bn_group: {cfg.model.bn_group} does not divide the micro-batch of "
                        f"{shard.micro} images (train.batch_size {cfg.train.batch_size} / {world} "
                        f"processes / train.accum_steps {cfg.train.accum_steps})")
    if accelerator.distributed_type.value == "DEEPSPEED":
        configure_deepspeed(accelerator, shard, cfg)
    train_set, eval_set, eval_name = build_datasets(cfg)
    return shard, train_set, eval_set, eval_name


def build_parts(cfg, accelerator, shard, train_set, eval_set, run_dir: Path, fault=None):
    """Everything ``engine.fit`` needs: the seeded model, prepared for training, its
    optimizer, the loader, the checkpoint writer and the precision policy."""
    from cifar_dist import engine
    from cifar_dist.checkpoint import CheckpointWriter
    from cifar_dist.data import build_train_loader
    from cifar_dist.models import build_model
    from cifar_dist.optim import build_optimizer
    from cifar_dist.precision import Precision
    from cifar_dist.repro import seed_everything

    seed_everything(cfg.run.seed)
    model = build_model(cfg.model)
    model, eval_model, train_model, optimizer = engine.prepare_model(cfg, accelerator, model, build_optimizer)
    loader = build_train_loader(cfg, train_set, shard, accelerator.device)
    parts = engine.Parts(cfg=cfg, accelerator=accelerator, model=model, train_model=train_model,
                         eval_model=eval_model, optimizer=optimizer, loader=loader, eval_set=eval_set,
                         shard=shard, run_dir=run_dir,
                         checkpoints=CheckpointWriter(run_dir, cfg.checkpoint.keep),
                         stop_file=run_dir / "STOP", fault=fault)
    parts.precision = Precision(cfg.run.precision, accelerator.device,
                                accelerator if parts.deepspeed else None)
    return parts


def restore(parts, ckpt: Path):
    """Load checkpoint ``ckpt`` into ``parts``; returns the TrainState it holds."""
    from cifar_dist import engine
    from cifar_dist.checkpoint import load_optimizer_state, load_weights, read_state

    state = engine.TrainState(**read_state(ckpt))
    if parts.deepspeed:
        parts.accelerator.load_state(str(ckpt))
    else:
        load_weights(ckpt / "model.safetensors", parts.model)
        parts.optimizer.load_state_dict(load_optimizer_state(ckpt / "optimizer.pt"))
    parts.precision.load_state_dict(state.scaler)
    return state


def _after_preemption(run_dir: Path, rank: int) -> None:
    """Mark the run as preempted; under Slurm, rank 0 requeues the job.

    No rank leaves before PREEMPTED exists: when the first process exits, a
    launcher may tear the others down (srun --kill-on-bad-exit counts a task
    Slurm sent TERM as failed), and a batch script that requeues on PREEMPTED
    (slurm/train.sh, which sets CIFAR_DIST_REQUEUE=0) must then still find it.
    The requeue comes after the barrier, as it ends every process of the job.
    """
    from cifar_dist.distributed import barrier

    if rank == 0:
        (run_dir / "PREEMPTED").write_text(str(time.time()))
    barrier()
    if rank != 0:
        return
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("CIFAR_DIST_REQUEUE", "1") == "1":
        import subprocess
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        print(f"scontrol requeue {job}: {'ok' if res.returncode == 0 else res.stderr.strip()}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cifar_dist/train.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(ap)
    args = ap.parse_args(argv)
    return guarded(run, args)


def guarded(fn, args) -> int:
    """Run ``fn(args)``; user errors and environment faults become one line and an exit code."""
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    try:
        return fn(args)
    except UserError as e:
        fail(str(e), 2)
    except (EnvironmentFault, TrainingFault) as e:
        fail(str(e), 1)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as e:  # a bug: name the rank, then show the traceback
        say(f"cifar-dist: {rank_prefix()}crashed: {type(e).__name__}: {e}")
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
