"""Weight averages of a run: an exponential moving average (EMA) of the weights and Lookahead's
slow weights, updated on the device after optimizer steps, and their checkpoint files.

    EMA        ema <- decay * ema + (1 - decay) * w   after every ``train.ema.every_steps``-th
               step; after each of the first ``warmup_steps`` steps a plain copy of w. The
               parameters and the BatchNorm running statistics are averaged, in fp32; integer
               buffers (num_batches_tracked) are copied. The average lives in a copy of the
               model, so evaluating it (``eval.use_ema``) is running that copy: the training
               weights and their BatchNorm state are never touched.
    Lookahead  after every ``train.lookahead.k``-th step: slow <- slow + alpha * (fast - slow),
               then fast <- slow (the parameters; the optimizer keeps its state).

Both follow the weights, which are the same on every rank, so every rank keeps the same
averages and nothing is communicated. Whether an update is due is decided from the host's step
count alone, and an update is a few foreach kernels: no host read, no loop over parameters.
The loop updates them after the step's BatchNorm statistics are synchronized and before any
checkpoint of that step, which saves them (``ema.safetensors``, ``lookahead.safetensors``), so
a resumed run continues them bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cifar_dist.config.schema import Config, EmaConfig, LookaheadConfig
from cifar_dist.errors import CheckpointError
from cifar_dist.storage.checkpoint import EMA_FILE, check_compatible, load_weights, write_tensors

LOOKAHEAD_FILE = "lookahead.safetensors"


class WeightEma:
    """The EMA of ``model``'s weights and buffers, held by ``module``, a copy of the model."""

    def __init__(self, cfg: EmaConfig, model: torch.nn.Module, module: torch.nn.Module):
        self.cfg = cfg
        self.module = module.float().requires_grad_(False)
        own, source = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        check_compatible(own, model.state_dict(), "train.ema")
        floats = [k for k, v in own.items() if v.is_floating_point()]
        others = [k for k in own if k not in floats]
        self.averaged, self.followed = [own[k] for k in floats], [source[k] for k in floats]
        self.copied, self.copied_from = [own[k] for k in others], [source[k] for k in others]
        self._copy()  # starts as the model's weights: step 0's average

    @torch.no_grad()
    def _copy(self) -> None:
        torch._foreach_copy_(self.averaged, self.followed)
        if self.copied:
            torch._foreach_copy_(self.copied, self.copied_from)

    @torch.no_grad()
    def after_step(self, steps_done: int) -> None:
        """Update after optimizer step number ``steps_done`` (from 1) when it is due."""
        if steps_done <= self.cfg.warmup_steps:
            self._copy()
        elif steps_done % self.cfg.every_steps == 0:
            torch._foreach_lerp_(self.averaged, self.followed, 1.0 - self.cfg.decay)
            if self.copied:
                torch._foreach_copy_(self.copied, self.copied_from)


class Lookahead:
    """Slow weights (fp32, on the device) that the model's parameters return to every k steps."""

    def __init__(self, cfg: LookaheadConfig, model: torch.nn.Module):
        self.cfg = cfg
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.fast: list[torch.Tensor] = [p for _, p in named]
        self.slow = [p.detach().clone().float() for p in self.fast]

    @torch.no_grad()
    def after_step(self, steps_done: int) -> None:
        if steps_done % self.cfg.k == 0:
            torch._foreach_lerp_(self.slow, self.fast, self.cfg.alpha)
            torch._foreach_copy_(self.fast, self.slow)

    def state_dict(self) -> dict:
        return dict(zip(self.names, self.slow))

    def load_state_dict(self, state: dict, source) -> None:
        check_compatible(state, self.state_dict(), source)
        for name, slow in zip(self.names, self.slow):
            slow.copy_(state[name])


class WeightAverages:
    """The run's EMA and Lookahead (either None when off), updated together after each step."""

    def __init__(self, ema: WeightEma | None = None, lookahead: Lookahead | None = None):
        self.ema, self.lookahead = ema, lookahead

    @classmethod
    def build(cls, cfg: Config, model: torch.nn.Module, ema_module: torch.nn.Module | None) -> WeightAverages:
        """The averages of ``model`` (prepared: on its device, maybe channels_last) as ``cfg``
        asks. ``ema_module``: a copy of the network taken before ``prepare_model`` (nothing
        wrapped, patched or hooked), to hold the EMA."""
        train, ema = cfg.train, None
        if train.ema is not None:
            assert ema_module is not None
            module = ema_module.to(next(model.parameters()).device)
            if cfg.run.channels_last:
                module = module.to(memory_format=torch.channels_last)
            ema = WeightEma(train.ema, model, module)
        lookahead = Lookahead(train.lookahead, model) if train.lookahead is not None else None
        return cls(ema, lookahead)

    def after_step(self, steps_done: int) -> None:
        """After optimizer step ``steps_done`` (from 1): Lookahead first, then the EMA of the
        weights the model then holds."""
        if self.lookahead is not None:
            self.lookahead.after_step(steps_done)
        if self.ema is not None:
            self.ema.after_step(steps_done)

    def save(self, folder: Path) -> None:
        """Their files in checkpoint ``folder`` (rank 0; every rank holds the same)."""
        if self.ema is not None:
            write_tensors(self.ema.module.state_dict(), Path(folder) / EMA_FILE)
        if self.lookahead is not None:
            write_tensors(self.lookahead.state_dict(), Path(folder) / LOOKAHEAD_FILE)

    def load(self, folder: Path) -> None:
        """Restore them from checkpoint ``folder`` (every rank)."""
        for average, name in ((self.ema, EMA_FILE), (self.lookahead, LOOKAHEAD_FILE)):
            path = Path(folder) / name
            if average is not None and not path.is_file():
                raise CheckpointError(f"{path}: missing (this checkpoint was written without its average)")
        if self.ema is not None:
            load_weights(Path(folder) / EMA_FILE, self.ema.module)
        if self.lookahead is not None:
            path = Path(folder) / LOOKAHEAD_FILE
            self.lookahead.load_state_dict(load_weights(path), path)
