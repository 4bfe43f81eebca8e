"""Optimisers (SGD, AdamW, LARS) built from a method's parameter groups.

Biases and normalisation parameters (every tensor with fewer than two dimensions) are put in
groups without weight decay and without LARS adaptation, as in SimCLR and BYOL
(arXiv:2002.05709 appendix B.1; LARS: You et al. 2017, arXiv:1708.03888).  Each optimiser group
carries ``base_lr_scale`` and ``fixed_lr`` so that the trainer sets every group's learning rate from
the global step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from clcli.methods.base import ParamGroup
from clcli.recipe import OptimConfig


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling.

    For a group with ``lars=True`` the update of each tensor w with gradient g (weight decay added
    first) is scaled by the trust ratio η‖w‖ / ‖g + λw‖; groups with ``lars=False`` take plain SGD
    steps.
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True, nesterov=nesterov)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """One group's update with foreach ops (one kernel per op for all tensors where the device has them)."""
        grads = [p.grad for p in params]
        d = torch._foreach_add(grads, params, alpha=group["weight_decay"]) if group["weight_decay"] != 0 else grads
        if group["lars"]:
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(d))
            trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
            d = torch._foreach_mul(d, list(trust.unbind()))
        if group["momentum"] != 0:
            states = [self.state[p] for p in params]
            old = [i for i, s in enumerate(states) if "momentum_buffer" in s]
            for i, s in enumerate(states):
                if "momentum_buffer" not in s:
                    s["momentum_buffer"] = d[i].clone()
            if old:
                bufs = [states[i]["momentum_buffer"] for i in old]
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, [d[i] for i in old])
            bufs = [s["momentum_buffer"] for s in states]
            d = torch._foreach_add(d, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
        torch._foreach_add_(params, d, alpha=-group["lr"])


def optimizer_groups(groups: list[ParamGroup], cfg: OptimConfig) -> list[dict[str, Any]]:
    """Split each method group into decayed and not-decayed parts; attach scheduling flags."""
    out: list[dict[str, Any]] = []
    for g in groups:
        params = [p for p in g.params if p.requires_grad]
        if cfg.exclude_bias_norm:
            regular = [p for p in params if p.ndim > 1]
            plain = [p for p in params if p.ndim <= 1]
        else:
            regular, plain = params, []
        for part, is_plain in ((regular, False), (plain, True)):
            if not part:
                continue
            decay = g.weight_decay and not is_plain
            out.append(
                {
                    "params": part,
                    "name": g.name + (".bias_norm" if is_plain else ""),
                    "weight_decay": cfg.weight_decay if decay else 0.0,
                    "apply_wd_schedule": decay,
                    "lars": not is_plain,
                    "fixed_lr": g.fixed_lr,
                    "lr_scale": g.lr_scale,
                }
            )
    return out


def update_kernels(device: torch.device | None) -> dict[str, bool | None]:
    """How torch's SGD and AdamW update the parameters on ``device``: one fused kernel on CUDA,
    foreach ops (a few calls for all tensors instead of a loop over them) elsewhere."""
    if device is not None and device.type == "cuda":
        return {"fused": True, "foreach": None}
    return {"fused": None, "foreach": True}


def set_update_kernels(optimizer: Optimizer, device: torch.device | None) -> None:
    """Set the update kernels of ``optimizer``'s groups for ``device`` (after a checkpoint from another device)."""
    if isinstance(optimizer, torch.optim.SGD | torch.optim.AdamW):
        for group in optimizer.param_groups:
            group.update(update_kernels(device))


def build_optimizer(
    groups: list[ParamGroup], cfg: OptimConfig, lr: float, device: torch.device | None = None
) -> Optimizer:
    """The recipe's optimiser over ``groups``, with the update kernels of ``device`` (:func:`update_kernels`)."""
    param_groups = optimizer_groups(groups, cfg)
    if not param_groups:
        raise ValueError("the method has no trainable parameters")
    kernels = update_kernels(device)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            param_groups,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            **kernels,
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            param_groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **kernels
        )
    return LARS(
        param_groups,
        lr=lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        eta=cfg.lars_eta,
        nesterov=cfg.nesterov,
    )


class LossScaling:
    """fp16's loss scaling (``torch.amp.GradScaler``; Micikevicius et al. 2018, arXiv:1710.03740), and
    plain backward and step for every other precision.

    With ``trainer.precision: fp16`` the loss is multiplied by a scale before the backward pass so
    that small float16 gradients do not underflow; :meth:`unscale` divides the gradients back (before
    the method's hooks and the gradient clip see them), and :meth:`step` skips a step whose gradients
    hold an inf or nan and then lowers the scale.  Otherwise the three calls are ``backward()``,
    nothing and ``optimizer.step()``.
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state (its scale and growth counter: JSON numbers) for a checkpoint; None without fp16."""
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`'s state on resume (a checkpoint without one leaves the initial scale)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def step(self, optimizer: Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
