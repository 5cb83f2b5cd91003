"""A training run, start to end: the Accelerator, data and model, the run directory, the loop, and
what the run leaves behind (weights, summary.json, plots), or its checkpoint when it is stopped."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

from cifar_dist.config.schema import Config
from cifar_dist.data import data_identity
from cifar_dist.distributed.accelerator import is_deepspeed, make_accelerator, release_process_group
from cifar_dist.distributed.collectives import barrier, print0, share_from_main, world_info
from cifar_dist.errors import CheckpointError, Interrupted, TrainingFault, UserError, say
from cifar_dist.model.resnet import count_parameters
from cifar_dist.runtime.provenance import device_name, git_sha, versions
from cifar_dist.runtime.seeding import apply_tf32, set_determinism
from cifar_dist.storage.checkpoint import list_checkpoints
from cifar_dist.storage.files import write_text_atomic
from cifar_dist.storage.results import results_of_step, time_to_target, write_results
from cifar_dist.storage.rundir import RunDir, default_run_dir, save_config
from cifar_dist.storage.state import TrainState
from cifar_dist.trainer import build
from cifar_dist.trainer.callbacks import Callbacks, StopAtTarget
from cifar_dist.trainer.progress import EstimatedTime, progress_bars
from cifar_dist.trainer.stopping import StopRequest
from cifar_dist.trainer.trainer import Trainer


def train(cfg: Config, resume: bool = False, overwrite: bool = False, user_callbacks=()) -> int:
    """Train as ``cfg`` says; returns the exit code (0; 130 after Ctrl-C). Raises UserError for bad input."""
    try:
        with StopRequest() as stop:
            code = _open_and_train(cfg, resume, overwrite, user_callbacks, stop)
    except UserError:  # a refusal, before any step: this rank has no collective under way
        release_process_group()
        raise
    release_process_group()  # its threads joined now: at the interpreter's shutdown gloo can abort
    return code


def _open_and_train(cfg: Config, resume: bool, overwrite: bool, user_callbacks, stop: StopRequest) -> int:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    build.resolve_run_precision(cfg)
    set_determinism(cfg.run.deterministic, compiling=cfg.run.compile)
    apply_tf32(cfg.run)
    started = time.time()
    git_sha()  # the code's commit as the run starts (summary.json's git_sha)

    accelerator = make_accelerator(cfg)
    rank, world = world_info()
    stop.say = say if rank == 0 else None
    # every rank takes rank 0's choice of run.precision=auto (nodes may differ)
    cfg.run.precision = share_from_main(lambda: cfg.run.precision)
    shard, train_set, eval_set, eval_name = build.build_data(cfg, accelerator)
    model = build.build_model_seeded(cfg)  # a user's factory fails here, before the run directory is touched

    run_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else None
    if run_dir is None:  # every rank must agree on the generated name
        run_dir = share_from_main(lambda: default_run_dir(cfg.name))
    cfg.run.out_dir = str(run_dir)
    rundir = RunDir(run_dir)
    ckpt = share_from_main(lambda: rundir.open(cfg.to_dict(), resume, overwrite))
    barrier()
    try:
        built_in = [EstimatedTime()] + (
            [StopAtTarget(cfg.eval.target_acc)] if cfg.eval.stop_at_target and cfg.eval.target_acc else []
        )
        user = user_callbacks if isinstance(user_callbacks, Callbacks) else Callbacks(user_callbacks)
        callbacks = user.plus(built_in)  # the user's named by their run.callbacks spec
        trainer = Trainer(
            cfg, accelerator, shard, train_set, eval_set, run_dir, model=model, callbacks=callbacks, stop=stop,
            progress=progress_bars(cfg.run.progress and rank == 0),
        )  # fmt: skip
        if ckpt is not None:
            state = trainer.restore(ckpt)
            print0(f"resuming from {ckpt} (epoch {state.epoch + 1}, step {state.global_step})")
            _check_world_change(cfg, state, shard, trainer.deepspeed, ckpt)
        elif resume:
            print0(f"{run_dir}: no checkpoint yet, starting from the beginning")
        images = f"{len(train_set):,} train / {len(eval_set):,} {eval_name} images"
        return _train(trainer, rundir, eval_name, images, started)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop installed its handler
        raise _interrupted(rundir, rank, world) from None
    except TrainingFault as e:  # before the first checkpoint, a run it created leaves nothing behind
        if rank == 0 and rundir.discard_unstarted():
            e.args = (f"{e}; nothing to keep, {rundir.path} removed",)
        raise


def _train(trainer: Trainer, rundir: RunDir, eval_name: str, images: str, started: float) -> int:
    """Train, then write the results."""
    cfg, state, run_dir, world = trainer.cfg, trainer.state, rundir.path, trainer.world
    if trainer.ended is not None:
        if share_from_main(lambda: results_of_step(run_dir, state.global_step)):
            print0(f"{run_dir}: already finished ({trainer.ended.value}, step {state.global_step}); nothing to do")
            rundir.close()
            trainer.accelerator.end_training()
            return 0
        print0(f"training ended at step {state.global_step} ({trainer.ended.value}); writing its results")
    state.segments.append({"world_size": world, "from_step": state.global_step})
    if trainer.rank == 0:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "STOP").unlink(missing_ok=True)
    print0(
        f"{cfg.name}: {cfg.model.name} ({count_parameters(trainer.model):,} parameters) on {world} x "
        f"{trainer.device.type}, {_mode_in_words(trainer.accelerator, world)}, {cfg.run.precision}"
        f"{', compiled' if cfg.run.compile else ''}{', channels_last' if cfg.run.channels_last else ''}"
    )
    shard = trainer.shard
    print0(
        f"batch {cfg.train.batch_size} global = {world} x {shard.per_process} per process "
        f"= {world} x {cfg.train.accum_steps} x {shard.micro_batch} micro; {trainer.loader.steps_per_epoch} "
        f"steps/epoch, {images}; run dir {run_dir}"
    )
    state = trainer.fit()
    if trainer.preempted:
        return _stopped(trainer, rundir)
    trainer.stop.phase = "finish"  # a signal from here on is noted; the results are still written

    evaluator = trainer.evaluator
    assert evaluator is not None  # a training run always has one
    final = evaluator.final()
    summary = _summary(trainer, final, eval_name, wall=time.time() - started)
    trainer.callbacks.call("on_train_end", summary)
    if trainer.rank == 0:
        _write_results(trainer, run_dir, summary, final)
    barrier()
    rundir.close()
    trainer.accelerator.end_training()
    return 0


def _stopped(trainer: Trainer, rundir: RunDir) -> int:
    """Ctrl-C: exit 130 with the resume command; otherwise exit 0, marked PREEMPTED (Slurm requeues)."""
    step, why = trainer.state.global_step, trainer.stop.reason
    if trainer.metrics is not None:
        trainer.metrics.close()
    if why == "SIGINT":
        print0(
            f"stopped by Ctrl-C at step {step}; checkpoint written; resume with: "
            f"{resume_command(rundir.path, trainer.world)}"
        )
        rundir.close()
        return 130
    kept = "checkpoint written" if step else "nothing trained yet"  # stopped while it started up
    print0(f"stopped by {why} at step {step}; {kept}, resume with --resume")
    _after_preemption(rundir.path, trainer.rank)
    return 0


def _check_world_change(cfg: Config, state: TrainState, shard, deepspeed: bool, ckpt: Path) -> None:
    """A checkpoint of another process count: exact with ``train.exact_reduce``; otherwise allowed with
    a warning of what changes; refused under DeepSpeed, whose ZeRO state is split by process."""
    before, now = state.world_size, shard.world
    if not before or before == now:
        return
    if deepspeed:
        raise CheckpointError(
            f"{ckpt}: a DeepSpeed checkpoint of {before} processes cannot be resumed on {now} "
            f"(ZeRO splits its state by process); resume it on {before}"
        )
    if cfg.train.exact_reduce:
        print0(f"resuming a run of {before} processes on {now}: train.exact_reduce keeps it bit-identical")
        return
    changes = ["gradients are summed in another order"]
    if not cfg.model.bn_group:
        changes.append(
            f"BatchNorm normalizes over {cfg.train.batch_size // before // cfg.train.accum_steps} "
            f"-> {shard.micro_batch} images per process (model.bn_group=0)"
        )
    if shard.rank == 0:
        say(
            f"cifar-dist: warning: resuming a run of {before} processes on {now}: without train.exact_reduce "
            f"{' and '.join(changes)}; it goes on, no longer bit-identical to an uninterrupted run "
            "(summary.json's segments record it)"
        )


def resume_command(run_dir: Path, world: int) -> str:
    """The command that continues the run in ``run_dir`` (its config is saved there)."""
    out = shlex.quote(str(run_dir))
    if world == 1:
        return f"cifar-dist train --out {out} --resume"
    return f"the same launch command with --out {out} --resume (its config is saved there)"


def _interrupted(rundir, rank: int, world: int):
    """The one line (exit 130) of a run aborted by Ctrl-C; an empty directory it created is removed."""
    if rank != 0:
        return Interrupted("interrupted")
    checkpoints = list_checkpoints(rundir.path)
    if checkpoints:
        rundir.close()
        return Interrupted(
            f"interrupted; newest checkpoint {checkpoints[-1].name} kept, resume with: "
            f"{resume_command(rundir.path, world)}"
        )
    if rundir.discard_unstarted():
        return Interrupted(f"interrupted before the first checkpoint; nothing to keep, {rundir.path} removed")
    rundir.close()
    return Interrupted(f"interrupted before the first checkpoint; {resume_command(rundir.path, world)} starts it again")


def _mode_in_words(accelerator, world: int) -> str:
    """How the processes work together, in words: "single process", "DDP over gloo", ..."""
    if is_deepspeed(accelerator):
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if world == 1:
        return "single process"
    if dist.is_initialized():
        return f"DDP over {dist.get_backend()}"
    return f"{accelerator.distributed_type.value} ({world} processes)"


def _summary(trainer: Trainer, final: dict, eval_name: str, wall: float) -> dict:
    cfg, state, world = trainer.cfg, trainer.state, trainer.world
    train_time = sum(r["epoch_time_s"] for r in state.history)
    images = sum(r["images_per_s"] * r["epoch_time_s"] for r in state.history)
    ips = images / train_time if train_time else 0.0
    graphs, warm = build.graph_count() if cfg.run.compile else None, trainer.graphs_after_warmup
    return {
        "test_acc": final["acc"],
        "test_loss": final["loss"],
        "eval_set": eval_name,
        "eval_images": final["count"],
        "tta": cfg.eval.tta,
        "weights": "ema" if trainer.evaluated is not trainer.model else "model",  # evaluated and exported
        "tta_views": final["views"],  # forward passes per image of the final evaluation
        "final_eval_time_s": final["eval_time_s"],
        "plain_eval_time_s": trainer.evaluator.plain_time_s if trainer.evaluator else None,  # latest without TTA
        "per_class_acc": final["per_class_acc"],
        "epochs": state.epoch,
        "steps": state.global_step,
        "world_size": world,
        "segments": state.segments,
        "wall_time_s": wall,
        "train_time_s": train_time,
        "images_per_s": ips,
        "images_per_s_per_device": ips / world,
        "skipped_steps": state.skipped_steps,
        "parameters": count_parameters(trainer.model),
        "compiled_graphs": graphs,
        "recompiles_after_warmup": graphs - warm if graphs is not None and warm is not None else None,
        "precision": cfg.run.precision,
        "seed": cfg.run.seed,
        "config": cfg.name,
        "git_sha": git_sha(),
        "versions": versions(),
        "device": device_name(trainer.device),
        "data": share_from_main(lambda: data_identity(cfg)),  # hashed by rank 0 alone, which checked the md5
        **time_to_target(state.history, cfg.eval.target_acc),
    }


def _write_results(trainer: Trainer, run_dir: Path, summary: dict, final: dict) -> None:
    """Rank 0: the run's results (summary.json last, which marks the run finished) and its last line."""
    write_results(run_dir, trainer.evaluated, summary, final["confusion"], trainer.cfg.run.plots)
    if trainer.metrics is not None:
        trainer.metrics.close()
    tta = "" if summary["tta"] == "none" else f", {summary['tta']} TTA: {summary['tta_views']} views"
    print0(
        f"{summary['eval_set']} accuracy {100 * final['acc']:.2f}% ({final['count']} images"
        f"{tta}); {summary['wall_time_s']:.1f} s; results in {run_dir}"
    )


def _after_preemption(run_dir: Path, rank: int) -> None:
    """Mark the run as preempted; under Slurm, rank 0 requeues the job. No rank leaves before PREEMPTED
    exists: a launcher may tear the others down when the first exits (srun --kill-on-bad-exit), and
    slurm/train.sh requeues on PREEMPTED. The requeue, which ends every process, follows the barrier."""
    if rank == 0:
        write_text_atomic(run_dir / "PREEMPTED", str(time.time()))
    barrier()
    job = os.environ.get("SLURM_JOB_ID")
    if rank == 0 and job and os.environ.get("CIFAR_DIST_REQUEUE", "1") == "1":
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        print(f"scontrol requeue {job}: {'ok' if res.returncode == 0 else res.stderr.strip()}", flush=True)
