"""Bitwise-reproducible training on CUDA (``trainer.deterministic``).

On the CPU a run is already reproducible: the same recipe and seed give the same loss sequence
bit for bit, and a resumed run continues the uninterrupted one exactly.  On CUDA that is not so
by default: cuDNN picks convolution algorithms that accumulate in a varying order, and some index
and scatter kernels add with atomics, so two runs of one recipe can drift apart in the last bits
from the first step.

``trainer.deterministic: true`` asks PyTorch for deterministic kernels throughout: deterministic
algorithms (``torch.use_deterministic_algorithms``), deterministic cuDNN without benchmarking, and
a fixed cuBLAS workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, set only when the environment does
not already set it; cuBLAS reads it when the process first uses it, so the setting belongs to the
process's first run).  The price is speed: deterministic kernels are often slower.  An operation
that has no deterministic CUDA kernel warns and runs as it would otherwise (``warn_only``), so a
run never stops for this reason; the warning names the operation.

The setting is global to the process and only ever switched on: a later run in the same process
with ``deterministic: false`` leaves it as it was (a notebook that enabled determinism itself
keeps it).
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"


def enable_determinism() -> None:
    """Switch PyTorch to deterministic kernels for the rest of the process (see the module notes)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def determinism_state() -> dict[str, object]:
    """What the process currently asks of PyTorch (recorded with a run's provenance)."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
