"""The one device rule: training, evaluation and export all place models with :func:`pick_device`."""

from __future__ import annotations

import torch

from clcli.errors import TrainingError


def pick_device(choice: str) -> torch.device:
    """The device for ``trainer.device``: ``cuda`` when asked for or (``auto``) when present, else the CPU.

    Asking for ``cuda`` where there is none is a :class:`~clcli.errors.TrainingError`; so is asking for
    ``mps`` (Apple's Metal GPUs, chosen only by name) where torch has no MPS backend available.
    """
    if choice == "mps":
        if not torch.backends.mps.is_available():
            raise TrainingError(
                "trainer.device is 'mps' but Apple's MPS backend is not available here (it needs a Mac with Apple "
                "silicon or an AMD GPU and a torch built with MPS); use trainer.device=auto"
            )
        return torch.device("mps")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("trainer.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")
