"""Weight averages updated on the device after optimizer steps: an EMA of the weights (in a copy of
the model, which ``eval.use_ema`` evaluates) and Lookahead's slow weights. Every rank keeps the same,
with no communication and no host read (the formulas: docs/averaging.md)."""

from __future__ import annotations

from pathlib import Path

import torch

from cifar_dist.config.schema import Config, EmaConfig, LookaheadConfig
from cifar_dist.errors import CheckpointError
from cifar_dist.model.optim import schedule_steps
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
        self.after_step(0)  # starts as the model's weights: step 0's average

    @torch.no_grad()
    def after_step(self, steps_done: int) -> None:
        """Update after optimizer step number ``steps_done`` (from 1) when it is due."""
        if steps_done <= self.cfg.warmup_steps:
            torch._foreach_copy_(self.averaged, self.followed)
        elif steps_done % self.cfg.every_steps == 0:
            torch._foreach_lerp_(self.averaged, self.followed, 1.0 - self.cfg.decay)
        else:
            return
        if self.copied:
            torch._foreach_copy_(self.copied, self.copied_from)


class Lookahead:
    """Slow weights (fp32, on the device) that the model's parameters (and, with ``buffers``, its
    BatchNorm running statistics) return to every k steps. ``schedule_steps``: the horizon of
    ``ramp_power``; ``last_step``: the run's last step, after which ``end_on_slow`` applies."""

    def __init__(self, cfg: LookaheadConfig, model: torch.nn.Module, schedule_steps: int = 1, last_step: int = 0):
        self.cfg, self.schedule_steps, self.last_step = cfg, max(schedule_steps, 1), last_step
        named: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
        if cfg.buffers:
            named += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        self.names = [n for n, _ in named]
        self.fast: list[torch.Tensor] = [p for _, p in named]
        self.slow = [p.detach().clone().float() for p in self.fast]

    def alpha_at(self, steps_done: int) -> float:
        """The fraction of the way the slow weights move at the update after step ``steps_done``."""
        c = self.cfg
        if c.ramp_power == 0:
            return c.alpha
        return 1.0 - (1.0 - c.alpha) * min(steps_done / self.schedule_steps, 1.0) ** c.ramp_power

    @torch.no_grad()
    def after_step(self, steps_done: int) -> None:
        due, ends = steps_done % self.cfg.k == 0, self.cfg.end_on_slow and steps_done == self.last_step
        if due:
            torch._foreach_lerp_(self.slow, self.fast, self.alpha_at(steps_done))
        if due or ends:
            torch._foreach_copy_(self.fast, self.slow)

    def state_dict(self) -> dict:
        return dict(zip(self.names, self.slow))

    def load_state_dict(self, state: dict, source) -> None:
        check_compatible(state, self.state_dict(), source)
        for name, slow in zip(self.names, self.slow):
            slow.copy_(state[name])


class WeightAverages:
    """The run's EMA and Lookahead (either None when off); a checkpoint holds their files (``Stateful``)."""

    collective = False

    def __init__(self, ema: WeightEma | None = None, lookahead: Lookahead | None = None):
        self.ema, self.lookahead = ema, lookahead

    @classmethod
    def build(
        cls, cfg: Config, model: torch.nn.Module, ema_module: torch.nn.Module | None, steps_per_epoch: int = 1
    ) -> WeightAverages:
        """The averages of the prepared ``model``; ``ema_module``: a copy taken before ``prepare_model``."""
        train, ema = cfg.train, None
        if train.ema is not None:
            assert ema_module is not None
            module = ema_module.to(next(model.parameters()).device)
            if cfg.run.channels_last:
                module = module.to(memory_format=torch.channels_last)
            ema = WeightEma(train.ema, model, module)
        lookahead = None
        if train.lookahead is not None:
            horizon = schedule_steps(train, steps_per_epoch)
            lookahead = Lookahead(train.lookahead, model, horizon, train.max_steps or horizon)
        return cls(ema, lookahead)

    def after_step(self, steps_done: int) -> None:
        """Lookahead first, then the EMA of the weights the model then holds."""
        if self.lookahead is not None:
            self.lookahead.after_step(steps_done)
        if self.ema is not None:
            self.ema.after_step(steps_done)

    def save(self, folder: Path) -> None:
        if self.ema is not None:
            write_tensors(self.ema.module.state_dict(), Path(folder) / EMA_FILE)
        if self.lookahead is not None:
            write_tensors(self.lookahead.state_dict(), Path(folder) / LOOKAHEAD_FILE)

    def load(self, folder: Path) -> None:
        ema, lookahead = Path(folder) / EMA_FILE, Path(folder) / LOOKAHEAD_FILE
        for average, path in ((self.ema, ema), (self.lookahead, lookahead)):
            if average is not None and not path.is_file():
                raise CheckpointError(f"{path}: missing (this checkpoint was written without its average)")
        if self.ema is not None:
            load_weights(ema, self.ema.module)
        if self.lookahead is not None:
            self.lookahead.load_state_dict(load_weights(lookahead), lookahead)
