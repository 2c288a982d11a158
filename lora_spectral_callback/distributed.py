"""The one collective the monitor needs: every rank must agree on a stop, or training hangs."""

from __future__ import annotations

import torch

__all__ = ["any_rank", "is_main_process"]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    return not _initialized() or torch.distributed.get_rank() == 0


def any_rank(flag: bool) -> bool:
    """True on every rank iff ``flag`` is True on some rank. All ranks must call it at the same step.

    Under DDP only rank 0 measures, so its stop decision has to reach the others; a single-process run returns
    ``flag`` untouched.
    """
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return flag
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())
