"""Which precision (and memory format) a run really uses on the device it runs on.

``trainer.precision: fp16`` autocasts to float16 and scales the loss (``torch.amp.GradScaler``) so
that small gradients do not underflow: the mixed precision of GPUs without bf16 arithmetic (T4,
V100; Micikevicius et al. 2018, arXiv:1710.03740).  It is a CUDA precision, refused elsewhere.

``trainer.precision: bf16`` is a speed choice: on a GPU, and on CPUs with bf16 instructions
(AVX512-BF16, AMX), bf16 autocast runs matrix work several times faster than fp32.  On a CPU
without them PyTorch emulates bf16, and the same work runs tens of times *slower* than fp32, so a
bf16 preset would turn a minutes-long run into days.  There, bf16 falls back to fp32, and the run
says so.

Whether this CPU is such a machine is measured once per process, not read from CPU flags (which
differ by vendor and operating system): one 256 x 256 matrix product in each precision, best of
three, and bf16 counts as slow only when it takes more than twice as long as fp32.  The outcomes
are far apart (native bf16 several times faster than fp32, emulated bf16 tens of times slower), so
neither call overhead nor a busy machine flips the answer; a CPU that converts to bf16 without
native products (AVX512 without BF16) keeps the bf16 it was asked for.  The probe is one small
product per precision, a fraction of a second where bf16 is emulated.
"""

from __future__ import annotations

import functools
import time

import torch

from clcli.errors import RecipeError
from clcli.recipe import Precision, Recipe


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_fast() -> bool:
    """False when a bf16 matrix product on this CPU takes more than twice as long as the fp32 one."""
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))

    def best(dtype: torch.dtype) -> float:
        x = a.to(dtype)
        x @ x  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) <= 2.0 * best(torch.float32)


def resolve_precision(requested: Precision, device: torch.device) -> tuple[Precision, str | None]:
    """The precision to use for ``requested`` on ``device``, and why it differs (None if it does not).

    ``fp16`` (autocast to float16 with a gradient scaler, for GPUs without bf16 such as the T4 and
    V100) is a CUDA precision: on any other device it is a :class:`RecipeError`.
    """
    if requested == "fp16" and device.type != "cuda":
        raise RecipeError(
            f"trainer.precision fp16 needs a CUDA GPU (float16 autocast with a gradient scaler, for GPUs without "
            f"bf16 such as the T4 and V100); this run is on the {device.type}: use trainer.precision=fp32 (or bf16)"
        )
    if requested == "bf16" and device.type == "cpu" and not cpu_bf16_is_fast():
        return "fp32", (
            "this CPU has no native bf16 arithmetic: emulated bf16 runs many times slower than fp32, "
            "so trainer.precision bf16 falls back to fp32 here"
        )
    return requested, None


def with_precision(recipe: Recipe, precision: Precision) -> Recipe:
    """A copy of ``recipe`` whose ``trainer.precision`` is ``precision``; ``recipe`` itself is unchanged.

    The copy is deep (no section is shared with ``recipe``) and the new value is validated on
    assignment like any recipe field, so an unknown precision is a :class:`pydantic.ValidationError`.
    """
    changed = recipe.model_copy(deep=True)
    changed.trainer.precision = precision
    return changed


def use_bf16(requested: str, device: torch.device) -> bool:
    """Whether bf16 autocast should be on for ``requested`` precision on ``device`` (never for fp16)."""
    return requested == "bf16" and resolve_precision("bf16", device)[0] == "bf16"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a training ``precision`` (resolved for its device); None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def use_channels_last(setting: bool | str, device: torch.device) -> bool:
    """Whether the networks and their input batches use the channels-last (NHWC) memory format.

    ``trainer.channels_last`` true or false is kept as it is.  ``auto`` is on for a CUDA device
    (cuDNN's convolutions, the tensor-core ones above all, run in NHWC without transposing) and on
    the CPU, where oneDNN's convolutions take NHWC without reordering each input into a blocked
    layout first: on two threads the ResNet-18 step ran faster with it, and on one thread no slower
    (``bench/notes/step_options.py``).  A recipe whose method regroups the batch inside the network
    (MoCo's shuffling BN) sets it off.
    """
    if setting == "auto":
        return device.type in ("cuda", "cpu")
    return bool(setting)
