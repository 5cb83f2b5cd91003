"""Mixed precision owned by the run, not by process-global state (the benchmark runs several in one
process): autocast, and for fp16 a gradient scaler whose skipped steps are counted on the device."""

from __future__ import annotations

import contextlib

import torch

from cifar_dist.config.registry import PRECISIONS
from cifar_dist.distributed.launcher import local_rank

# run.precision -> autocast dtype, from the registry of precisions (fp32: no autocast)
DTYPES = {name: getattr(torch, p["dtype"]) for name, p in PRECISIONS.items() if p["dtype"]}


def gpu_capability() -> tuple[int, int] | None:
    """Compute capability of this process's GPU (the launcher's LOCAL_RANK), None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(min(local_rank(), torch.cuda.device_count() - 1))


class Precision:
    """Autocast, backward and optimizer step in ``precision``; under DeepSpeed, the Accelerator's."""

    def __init__(self, precision: str, device: torch.device, accelerator=None):
        self.precision, self.device = precision, torch.device(device)
        self.accelerator = accelerator
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" and accelerator is None else None
        # Steps skipped for overflowing gradients, counted on the device: reading the
        # scaler's scale on the host every step would synchronize with the GPU.
        self._skipped = torch.zeros((), device=self.device)
        self._skipped_host = 0  # DeepSpeed reports its skips as a Python bool

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input: under DeepSpeed, whose engine holds bf16/fp16 weights and runs
        no autocast, in that dtype (fp32 inputs would meet bf16 weights at the first conv)."""
        if self.accelerator is not None and self.precision in DTYPES:
            return x.to(DTYPES[self.precision])
        return x

    def autocast(self):
        if self.accelerator is not None:
            return self.accelerator.autocast()
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def unscale(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(_plain(optimizer))

    def step(self, optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            if self.accelerator is not None and self.accelerator.optimizer_step_was_skipped:
                self._skipped_host += 1
            return
        scale = self.scaler._scale  # the scale as a device tensor (get_scale() reads it on the host)
        before = scale.clone() if scale is not None else None
        self.scaler.step(_plain(optimizer))
        self.scaler.update()
        after = self.scaler._scale
        if before is not None and after is not None:  # the scale drops exactly when a step is skipped
            self._skipped += (after < before).float()

    def skipped_count(self) -> torch.Tensor:
        """Steps skipped so far, a 0-dim device tensor (read it with the other control flags)."""
        return self._skipped + self._skipped_host

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def _plain(optimizer):
    """The optimizer inside Accelerate's wrapper. GradScaler lets a fused optimizer skip an
    overflowing step by itself, without reading found_inf on the host, but it cannot see
    through the wrapper; unscale_ and step must also name the same object."""
    return getattr(optimizer, "optimizer", optimizer)
