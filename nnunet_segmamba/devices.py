"""What a `device` argument means ("auto", "cpu", "cuda", "cuda:N"), and what a limit of cuDNN's algorithm search may
be, in one place for every command and trainer."""
from __future__ import annotations

from .errors import SetupError, UserError

__all__ = ["check_cudnn_benchmark_limit", "resolve_device"]


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


def check_cudnn_benchmark_limit(limit, name: str = "cudnn_benchmark_limit") -> None:
    """Accepts None (torch's setting left alone) or an int >= 0 (`torch.backends.cudnn.benchmark_limit`: how many
    algorithms cuDNN's search times per convolution, 0 for every one); a bool is refused, since True would pass as
    the limit 1. `name` says where the value came from in the error.

    Raises:
        ValueError: any other value.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"{name} must be None or an int >= 0 (0: every algorithm), got {limit!r}")
