"""Count, on a CPU, the calls cifar_dist's own code makes that would synchronize the host
with a CUDA stream: reading a tensor's value (``item``, ``float()``, ``int()``, ``bool()``,
``tolist``, ``cpu``, ``numpy``), building a tensor from host data on a device
(``torch.tensor``/``as_tensor`` with ``device=``) and blocking device copies
(``.to(device)`` without ``non_blocking=True``). A ``TorchFunctionMode`` sees every one
of them; on a GPU, ``torch.cuda.set_sync_debug_mode("error")`` is the same check.

    with SyncCounter() as syncs:
        syncs.context = step     # (optional) tags the calls that follow
        ...                      # syncs.calls: [(context, label, "file:line"), ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

PACKAGE = str(Path(__file__).resolve().parent.parent / "cifar_dist")
TORCH = str(Path(torch.__file__).resolve().parent)
_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.__float__: "float()",
    torch.Tensor.__int__: "int()",
    torch.Tensor.__bool__: "bool()",
    torch.Tensor.__index__: "index",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
}
_FACTORIES = {torch.tensor: "torch.tensor", torch.as_tensor: "torch.as_tensor"}


def _names_device(args, kwargs) -> bool:
    """Whether a ``Tensor.to`` call names a device (not just a dtype) and may block."""
    if kwargs.get("non_blocking"):
        return False
    return "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:])


def _changes_device(args, kwargs) -> bool:
    target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
    return target is not None and torch.device(target) != args[0].device


# torch's own dispatch wrappers between a call in our code and the mode
_WRAPPERS = (
    str(Path(torch.__file__).resolve().parent / "overrides.py"),
    str(Path(torch.__file__).resolve().parent / "_tensor.py"),
)


class SyncCounter(TorchFunctionMode):
    """Value reads count wherever they happen below cifar_dist's code (GradScaler's
    found_inf.item(), say); a copy counts when cifar_dist asks for it itself, or when a
    library call it makes really moves data to another device (libraries often call
    ``.to(device)`` on tensors that are already there, which costs nothing)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[object, str, str]] = []
        self.context = None

    def _caller(self) -> tuple[str | None, bool]:
        """(file:line of the nearest cifar_dist frame or None, whether it made the call itself)."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename in _WRAPPERS:
            frame = frame.f_back
        direct = frame is not None and frame.f_code.co_filename.startswith(PACKAGE)
        while frame is not None and not frame.f_code.co_filename.startswith(PACKAGE):
            frame = frame.f_back
        if frame is None:
            return None, False
        return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}", direct

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        label, copy = _READS.get(func), False
        if label is None and func in _FACTORIES and kwargs.get("device") is not None:
            label, copy = _FACTORIES[func], True
        if label is None and func is torch.Tensor.to and _names_device(args, kwargs):
            label, copy = ".to(device)", True
        if label is not None:
            where, direct = self._caller()
            if where is not None and (
                not copy or direct or (func is torch.Tensor.to and _changes_device(args, kwargs))
            ):
                self.calls.append((self.context, label, where))
        return func(*args, **kwargs)
