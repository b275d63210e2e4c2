"""What a `device` argument means ("auto", "cpu", "cuda", "cuda:N"), in one place for every command."""
from __future__ import annotations

from .errors import SetupError, UserError

__all__ = ["resolve_device"]


def resolve_device(device: str = "auto"):
    """"auto" -> cuda when a CUDA device is available, else cpu; any other name as a torch.device.

    Raises:
        UserError: not a CPU or CUDA device name. SetupError: a CUDA device asked for where none is available.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r} (--device) is not a device this package runs on; use auto, cpu, cuda "
                        f"or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"device {device!r} was asked for but no CUDA device is available; use --device cpu or auto")
    return dev
