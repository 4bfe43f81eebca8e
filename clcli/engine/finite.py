"""Finiteness of what a checkpoint holds: no checkpoint is written from, or read with, nan or inf.

A finite loss does not make a finite update (an enormous learning rate, an overflow in an
optimiser's moments), so before each checkpoint the trainer checks every floating-point tensor
the checkpoint would hold: the method's parameters and buffers (momentum teachers, queues,
memory banks, centres, prototypes) and the optimiser's state.  The check is fused per device and
dtype and runs only when a checkpoint is due (never per step): per tensor, the largest absolute
value (``torch._foreach_norm`` with ``ord=inf``: inf for a tensor holding an inf, and nan for one
holding a nan where the kernel's max propagates nan, as on the CPU and CUDA) and the sum of
absolute values (``ord=1``: nan exactly when the tensor holds a nan, whatever the max does), all
stacked into one flag vector that is read back once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from clcli.engine import checkpoint as ckpt
from clcli.engine.ddp import any_rank
from clcli.errors import CheckpointError, TrainingError


def _finite_flags(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One boolean per tensor, on their device: true when it holds neither nan nor inf.

    max |x| is inf when an element is inf (and nan for a nan where max propagates nan); sum |x|
    is nan exactly when an element is nan (it is never inf - inf, the terms being >= 0), so a
    max that skips nans does not hide one, and a large but finite sum does not count.
    """
    try:
        largest = torch._foreach_norm(tensors, float("inf"))
        total = torch._foreach_norm(tensors, 1)
    except (RuntimeError, NotImplementedError, TypeError):  # a dtype or device without the fused kernel
        largest = [t.abs().amax() for t in tensors]
        total = [t.abs().sum() for t in tensors]
    largest_finite = torch.isfinite(torch.stack([n.float() for n in largest]))
    return largest_finite & ~torch.isnan(torch.stack([n.float() for n in total]))


def _checked(tensors: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The entries :func:`non_finite` checks: the non-empty floating-point tensors."""
    return [
        (name, value.detach())
        for name, value in tensors.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 0
    ]


def non_finite(tensors: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point tensors in ``tensors`` that hold a nan or an inf.

    Other values (integer tensors such as queue pointers, plain numbers) and empty tensors are left
    out.  When everything is finite this reads one boolean per device and dtype back to the host.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, torch.Tensor]]] = {}
    for name, value in _checked(tensors):
        groups.setdefault((value.device, value.dtype), []).append((name, value))
    bad: list[str] = []
    for items in groups.values():
        finite = _finite_flags([t for _, t in items])
        if not bool(finite.all()):
            bad += [name for (name, _), ok in zip(items, finite.tolist(), strict=True) if not ok]
    return bad


def optimizer_tensors(optimizer_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of an optimiser's ``state_dict()``, named ``optimizer.<parameter id>.<name>``."""
    return {
        f"optimizer.{pid}.{name}": value
        for pid, entry in optimizer_state["state"].items()
        for name, value in entry.items()
        if isinstance(value, torch.Tensor)
    }


def _readable(names: list[str], parameter_names: dict[int, str], total: int) -> str:
    """``k of n tensors (a, b, c and k - 3 more)``, optimiser entries named after their parameter."""
    shown = []
    for name in names[:4]:
        if name.startswith("optimizer."):
            _, pid, what = name.split(".", 2)
            name = f"{what} of {parameter_names.get(int(pid), 'parameter ' + pid)} in the optimiser state"
        shown.append(name)
    more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    return f"{len(names)} of {total} tensors ({', '.join(shown)}{more})"


def _parameter_names(method: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """The optimiser's parameter ids (as its ``state_dict`` numbers them) -> the method's parameter names."""
    by_object = {id(p): n for n, p in method.named_parameters()}
    names, pid = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            names[pid] = by_object.get(id(p), f"parameter {pid}")
            pid += 1
    return names


def last_finite_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of a run whose weights and optimiser state are all finite, or None."""
    for candidate in reversed(ckpt.complete_checkpoints(Path(run_dir))):
        if ckpt.checkpoint_problem(candidate) is not None:
            continue
        try:
            model = ckpt.load_model_state(candidate)
            extra = ckpt.load_optimizer_tensors(candidate)
        except CheckpointError:
            continue
        if not non_finite(model) and not non_finite({k: v for k, v in extra.items() if k.startswith("state.")}):
            return candidate
    return None


def last_finite_hint(run_dir: Path) -> str:
    """``the last finite checkpoint is ...`` (or that there is none), for an error message."""
    last = last_finite_checkpoint(run_dir)
    return f"the last finite checkpoint is {last}" if last is not None else f"{run_dir} has no finite checkpoint"


def refuse_non_finite_state(
    method: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: Mapping[str, Any],
    optimizer_state: dict[str, Any],
    step: int,
    run_dir: Path,
) -> None:
    """Before a checkpoint: a :class:`TrainingError` when a weight, buffer or optimiser tensor holds nan or inf.

    Every process checks its own state; all of them stop when any finds one.  The message names
    the tensors and the last checkpoint that is truly finite.
    """
    tensors = {**model_state, **optimizer_tensors(optimizer_state)}
    bad = non_finite(tensors)
    if not any_rank(bool(bad)):
        return
    which = _readable(bad, _parameter_names(method, optimizer), len(_checked(tensors))) if bad else ""
    raise TrainingError(
        f"the model's weights or optimiser state became non-finite (nan or inf) at or before step {step}"
        + (f": {which}" if which else " on another process")
        + f"; stopped without saving; {last_finite_hint(run_dir)}. Try a lower optim.lr, "
        "trainer.precision=fp32 or a gradient clip (optim.grad_clip)."
    )


def refuse_non_finite_weights(weights: Mapping[str, Any], path: Path, run_dir: Path | None) -> None:
    """A :class:`CheckpointError` when a checkpoint's weights hold nan or inf: they would score as noise."""
    bad = non_finite(weights)
    if not bad:
        return
    last = last_finite_checkpoint(run_dir) if run_dir is not None else None
    hint = f"; the last finite checkpoint of {run_dir} is {last}: pass --checkpoint {last} to use it" if last else ""
    described = _readable(bad, {}, len(_checked(weights)))
    raise CheckpointError(f"checkpoint {path} holds non-finite weights (nan or inf) in {described}{hint}")
