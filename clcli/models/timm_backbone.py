"""Backbones from timm (``model.backbone.name: timm:NAME``) and local pretrained weights for any backbone.

Any architecture of the ``timm`` package (Wightman, "PyTorch Image Models") is built with its
classifier removed (``num_classes=0``), so its ``forward`` returns the pooled feature vector, and
never with downloaded weights (``pretrained=False``): a recipe that wants pretrained weights names
a local file in ``model.backbone.pretrained_file``.  Vision transformers get
``img_size=model.backbone.image_size`` and ``dynamic_img_size=True``, so that multi-crop views of
other sizes (DINO's and SwAV's local crops) are embedded with interpolated position embeddings, as
DINO does (arXiv:2104.14294).  ``model.backbone.cifar_stem`` gives ResNet-like models (a ``conv1``
stem, a batch norm and a max-pool) SimCLR's small-image stem (arXiv:2002.05709, appendix B.9): one
3x3 stride-1 convolution in place of the stem and no max-pool; transformers ignore it (their patch
size is their stem, like the built-in ViT), and other architectures refuse it.  The feature
dimension is read from the model by one forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clcli.errors import CheckpointError, RecipeError
from clcli.recipe import BackboneConfig

PREFIX = "timm:"
_INSTALL = "timm is not installed: pip install 'clcli[timm]' (or pip install timm)"


def is_timm(name: str) -> bool:
    """Whether ``name`` names a timm architecture (``timm:NAME``)."""
    return name.startswith(PREFIX)


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise RecipeError(f"model.backbone.name: {_INSTALL}") from None
    return timm


def _create(timm: Any, arch: str, cfg: BackboneConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The model without classifier and the keyword arguments it was built with (the most that apply)."""
    base: dict[str, Any] = {"num_classes": 0, "in_chans": cfg.in_channels}
    tries = ({"img_size": cfg.image_size, "dynamic_img_size": True}, {"img_size": cfg.image_size}, {})
    for extra in tries:
        kwargs = {**base, **extra}
        try:
            return timm.create_model(arch, pretrained=False, **kwargs), kwargs
        except TypeError as exc:
            if not any(f"'{k}'" in str(exc) for k in extra):  # a failure that is not about these arguments
                raise RecipeError(f"model.backbone.name: timm could not build {arch!r}: {exc}") from None
    raise AssertionError("unreachable: the last try has no extra argument")


def _cifar_stem(model: nn.Module, in_channels: int) -> bool:
    """Give a ResNet-like model SimCLR's CIFAR stem; False when the architecture has no such stem."""
    conv, bn, pool = (getattr(model, n, None) for n in ("conv1", "bn1", "maxpool"))
    if conv is None or not isinstance(bn, nn.BatchNorm2d) or pool is None:
        return False
    stem = nn.Conv2d(in_channels, bn.num_features, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = stem
    model.maxpool = nn.Identity()
    return True


def timm_metadata(cfg: BackboneConfig) -> dict[str, str]:
    """What an export records about a timm backbone (``{}`` for others): the architecture and the
    arguments of ``timm.create_model``, plus whether the CIFAR stem replaced its stem."""
    if not is_timm(cfg.name):
        return {}
    model = build_timm(cfg)
    info = {"name": model.timm_name, "kwargs": model.timm_kwargs, "cifar_stem": model.timm_cifar_stem}  # type: ignore[attr-defined]
    return {"timm": json.dumps(info)}


def build_timm(cfg: BackboneConfig) -> nn.Module:
    """The timm architecture ``cfg.name`` (``timm:NAME``), randomly initialised, as a clcli backbone.

    An unknown name, a missing timm, or a CIFAR stem asked of an architecture without a ResNet-like
    stem is a :class:`RecipeError`.  The module gains ``feature_dim`` and, for exports,
    ``timm_name``, ``timm_kwargs`` and ``timm_cifar_stem``.
    """
    timm = _timm()
    arch = cfg.name.removeprefix(PREFIX)
    if not timm.is_model(arch):
        raise RecipeError(f"model.backbone.name: timm has no architecture {arch!r} (timm.list_models() lists them)")
    model, kwargs = _create(timm, arch, cfg)
    vit_like = hasattr(model, "patch_embed")
    stem = False
    if cfg.cifar_stem and not vit_like:
        stem = _cifar_stem(model, cfg.in_channels)
        if not stem:
            raise RecipeError(
                f"model.backbone.cifar_stem: timm's {arch} has no ResNet-like stem (conv1, bn1, maxpool) to replace "
                "with the CIFAR stem; set model.backbone.cifar_stem=false"
            )
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probe = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size)
        try:
            out = model(probe)
        except Exception as exc:  # noqa: BLE001 - a shape the architecture cannot take
            raise RecipeError(
                f"model.backbone: timm's {arch} cannot embed a {cfg.image_size} px image "
                f"(model.backbone.image_size): {exc}"
            ) from None
    model.train(was_training)
    if out.dim() != 2:
        raise RecipeError(
            f"model.backbone.name: timm's {arch} gives features of shape {list(out.shape[1:])}, not a vector"
        )
    model.feature_dim = int(out.shape[1])
    if vit_like:
        _check_patch_multiples(model, arch)
    model.timm_name, model.timm_kwargs, model.timm_cifar_stem = arch, kwargs, stem
    return model


def _check_patch_multiples(model: nn.Module, arch: str) -> None:
    """Refuse, with a :class:`RecipeError`, an input whose sides are no multiple of the ViT's patch size
    (timm would stop on an assertion): a view or evaluation size the recipe must change."""
    patch = getattr(model.patch_embed, "patch_size", None)
    if not isinstance(patch, tuple | list) or len(patch) != 2:
        return
    ph, pw = int(patch[0]), int(patch[1])

    def check(_module: nn.Module, args: tuple[Any, ...]) -> None:
        h, w = args[0].shape[-2:]
        if h % ph or w % pw:
            raise RecipeError(
                f"timm's {arch} cuts images into {ph}x{pw} patches, so an input of {h}x{w} px cannot be embedded: "
                f"make every view size (views.groups.N.size) and views.eval_size a multiple of {ph}"
            )

    model.register_forward_pre_hook(check)


# ----------------------------------------------------------------------------- pretrained files
def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of a classifier a checkpoint may hold that the backbone has removed."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in (*names, "fc", "head"))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a torch file read with ``weights_only=True`` (no pickled code).

    A torch file holding ``state_dict`` or ``model`` under a key is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.backbone.pretrained_file: {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the reader says is the user's file's problem
        raise CheckpointError(
            f"model.backbone.pretrained_file: cannot read {path} as safetensors or a weights-only torch file: {exc}"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"model.backbone.pretrained_file: {path} does not hold a mapping of tensor names")
    return state


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights of ``path`` into ``model``: every parameter and buffer must be there with its shape.

    Keys of a classifier the backbone does not have (``fc.*``, ``head.*``, timm's named classifier)
    are left out; any other missing or unexpected key, or a shape that differs, is a
    :class:`CheckpointError` naming a few of them.
    """
    state = read_weights(Path(path))
    own = model.state_dict()
    skip = _classifier_prefixes(model)
    state = {k: v for k, v in state.items() if k in own or not k.startswith(skip)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {list(state[k].shape)} (the backbone's: {list(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong))
            if keys
        ]
        raise CheckpointError(
            f"model.backbone.pretrained_file: {path} does not fit model.backbone ({'; '.join(parts)})"
        )
    model.load_state_dict(state, strict=True)
    return model
