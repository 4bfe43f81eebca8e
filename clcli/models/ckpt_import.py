"""Published self-supervised checkpoints mapped onto clcli's backbones (``clcli import``).

Each layout names where the encoder sits in the file the official release (or its common PyTorch
port) publishes, which head parameters are dropped, and which branch is taken by default:

* ``moco``: MoCo v1/v2 (He et al. 2019, arXiv:1911.05722; Chen et al. 2020, arXiv:2003.04297),
  ``state_dict`` with ``module.encoder_q.*``; the projection ``fc`` is dropped.
* ``mocov3``: MoCo v3 (Chen, Xie, He 2021, arXiv:2104.02057), ``module.base_encoder.*`` (branch
  ``base``) or ``module.momentum_encoder.*`` (``momentum``); ``fc`` / ``head`` dropped.
* ``swav``: SwAV (Caron et al. 2020, arXiv:2006.09882), ``module.*`` with ``projection_head`` and
  ``prototypes`` dropped.
* ``dino``: DINO (Caron et al. 2021, arXiv:2104.14294), a training checkpoint's ``teacher`` (or
  ``student``) with ``backbone.*``, or the released backbone-only ResNet-50 / ViT state dicts.
* ``byol``: BYOL (Grill et al. 2020, arXiv:2006.07733) as its PyTorch ports publish it: a learner's
  ``online_encoder.net.*`` (or ``target_encoder.net.*``), an ``online_network_state_dict`` whose
  ``encoder`` is torchvision's ResNet children in a ``Sequential``, or a plain ResNet state dict.
* ``simclr``: SimCLR (Chen et al. 2020, arXiv:2002.05709) as its PyTorch ports publish it:
  ``encoder.*`` with a ``projector``, ``backbone.*`` with an MLP in ``fc``, or the converted
  TensorFlow ResNet-50 (torchvision names in ``state_dict``).
* ``simsiam``: SimSiam (Chen & He 2020, arXiv:2011.10566), ``module.encoder.*`` with ``fc`` (the
  projector) and ``predictor`` dropped.
* ``torchvision``: a plain torchvision ResNet or timm-named ViT state dict (``fc`` / ``head`` dropped).

After the encoder's keys are found, ResNets keep torchvision's names (clcli's ResNets are
torchvision's) and ViTs in timm's names (DINO, MoCo v3) are renamed to clcli's
:class:`~clcli.models.backbones.VisionTransformer`.  The architecture is read from the tensors
(ResNet depth from its blocks, the CIFAR stem from a 3x3 first convolution; ViT width, depth,
patch and image size from its embeddings); a ViT's number of heads is not in its weights and
comes from the layout's convention (MoCo v3: 12 for ViT-S/B, 16 above; others: width / 64) or
``heads``.  Every key of the backbone must be found with its shape: missing, unexpected and
mis-shaped keys are a :class:`~clcli.errors.CheckpointError` naming them.

Files: safetensors are read directly; torch pickles with ``torch.load(weights_only=True)`` (no
code runs; ``argparse.Namespace``, which DINO's and MoCo's checkpoints store their arguments in,
is allowed).  A pickle holding other Python objects is refused unless ``trust_pickle``.
"""

from __future__ import annotations

import argparse
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clcli.errors import CheckpointError, ClcliError
from clcli.recipe import BackboneConfig

__all__ = ["LAYOUTS", "Imported", "Layout", "map_checkpoint", "read_checkpoint"]

_GENERIC = ("module.backbone.", "backbone.", "module.", "")


@dataclass(frozen=True)
class Layout:
    """Where a release keeps its encoder: per branch, the containers and key prefixes tried in order."""

    name: str
    paper: str
    branches: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    drop: tuple[str, ...]
    vit_heads: dict[int, int] = field(default_factory=dict)

    @property
    def default_branch(self) -> str:
        return next(iter(self.branches))


LAYOUTS: dict[str, Layout] = {
    lay.name: lay
    for lay in (
        Layout(
            "moco",
            "arXiv:1911.05722",
            {"query": (("state_dict",), ("module.encoder_q.", "encoder_q."))},
            ("fc.",),
        ),
        Layout(
            "mocov3",
            "arXiv:2104.02057",
            {
                "base": (("state_dict",), ("module.base_encoder.", "base_encoder.")),
                "momentum": (("state_dict",), ("module.momentum_encoder.", "momentum_encoder.")),
            },
            ("fc.", "head."),
            vit_heads={384: 12, 768: 12, 1024: 16, 1280: 16},
        ),
        Layout(
            "swav",
            "arXiv:2006.09882",
            {"model": (("state_dict",), ("module.", ""))},
            ("projection_head.", "prototypes.", "fc."),
        ),
        Layout(
            "dino",
            "arXiv:2104.14294",
            {"teacher": (("teacher",), _GENERIC), "student": (("student",), _GENERIC)},
            ("head.", "fc."),
        ),
        Layout(
            "byol",
            "arXiv:2006.07733",
            {
                "online": (
                    ("online_network_state_dict", "state_dict", "model"),
                    ("module.online_encoder.net.", "online_encoder.net.", "module.encoder.", "encoder.", *_GENERIC),
                ),
                "target": (
                    ("target_network_state_dict", "state_dict", "model"),
                    ("module.target_encoder.net.", "target_encoder.net.", "module.encoder.", "encoder.", *_GENERIC),
                ),
            },
            ("fc.", "projetion.", "projection.", "projector.", "predictor.", "online_predictor."),
        ),
        Layout(
            "simclr",
            "arXiv:2002.05709",
            {"model": (("state_dict", "model"), ("module.encoder.", "encoder.", *_GENERIC))},
            ("fc.", "projector.", "projection_head.", "head."),
        ),
        Layout(
            "simsiam",
            "arXiv:2011.10566",
            {"model": (("state_dict",), ("module.encoder.", "encoder."))},
            ("fc.",),
        ),
        Layout("torchvision", "", {"model": (("state_dict", "model"), ("module.", ""))}, ("fc.", "head.")),
    )
}

# torchvision's ResNet children as a Sequential (``nn.Sequential(*list(resnet.children())[:-1])``)
_SEQUENTIAL = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_RESNETS = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50}


# --------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """The object stored in ``path``: a safetensors file's tensors, or a torch file's contents.

    Torch files are read with ``weights_only=True``; one that needs other Python objects is refused
    unless ``trust_pickle`` (then it is unpickled fully, which runs code stored in the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists() else f"{path} is not a file")
    with path.open("rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a broken file is the user's input
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles with code, truncated files, other formats
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if not trust_pickle:
            raise CheckpointError(
                f"{path} does not load as tensors alone (torch.load with weights_only=True: {reason}). If it is a "
                "pickle holding other Python objects, reading it runs code stored in the file: pass --trust-pickle "
                "only if you trust its source"
            ) from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path} as a torch file: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------------- mapping
@dataclass
class Imported:
    """A backbone's state dict found in a published checkpoint, with what was taken and left."""

    state_dict: dict[str, Tensor]
    config: BackboneConfig
    layout: str
    branch: str
    prefix: str
    container: str | None
    dropped: list[str]
    input_size: int


def _listing(keys: list[str] | set[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _tensors(obj: Any) -> dict[str, Tensor]:
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _state(obj: Any, containers: tuple[str, ...], layout: Layout, branch: str) -> tuple[dict[str, Tensor], str | None]:
    if isinstance(obj, dict):
        for key in containers:
            if isinstance(obj.get(key), dict) and _tensors(obj[key]):
                return _tensors(obj[key]), key
        # a branch not in the file (e.g. --branch student of a backbone-only file) is an error, not a fallback
        others = [c for b, (cs, _) in layout.branches.items() if b != branch for c in cs if c not in containers]
        if any(isinstance(obj.get(c), dict) for c in others):
            raise CheckpointError(f"the file has no {containers[0]!r} entry for --branch {branch}")
    found = _tensors(obj)
    if not found:
        keys = list(obj)[:8] if isinstance(obj, dict) else []
        raise CheckpointError(
            f"found no state dict (names to tensors) in the file; looked in {', '.join(map(repr, containers))}"
            + (f"; its top-level keys: {', '.join(map(str, keys))}" if keys else f" (it holds a {type(obj).__name__})")
        )
    return found, None


def _strip(sd: dict[str, Tensor], prefixes: tuple[str, ...], layout: Layout) -> tuple[dict[str, Tensor], str]:
    for prefix in prefixes:
        taken = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if taken:
            return taken, prefix
    tops = sorted({k.split(".")[0] + "." for k in sd})
    raise CheckpointError(
        f"no key starts with {' or '.join(repr(p) for p in prefixes)} (the {layout.name} layout); the file's keys "
        f"start with {_listing(tops)}: is it another layout (--from)?"
    )


def _rename(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's Sequential indices and timm's ViT names to clcli's names."""
    if "0.weight" in sd and any(k.startswith("4.0.") for k in sd):
        sd = {(_SEQUENTIAL.get(k.split(".")[0], k.split(".")[0]) + k[k.index(".") :]): v for k, v in sd.items()}
    if "cls_token" in sd:
        out = {}
        for k, v in sd.items():
            k = k.replace("patch_embed.proj.", "patch_embed.")
            k = re.sub(r"^(blocks\.\d+\.mlp\.)fc1\.", r"\g<1>0.", k)
            k = re.sub(r"^(blocks\.\d+\.mlp\.)fc2\.", r"\g<1>2.", k)
            out[k] = v
        sd = out
    return sd


def _count(sd: dict[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def _infer(sd: dict[str, Tensor], layout: Layout, heads: int | None) -> tuple[BackboneConfig, int]:
    """The backbone configuration the tensors describe, and the input size it was trained at."""
    if "conv1.weight" in sd and any(k.startswith("layer4.") for k in sd):
        blocks = tuple(_count(sd, rf"^layer{i}\.(\d+)\.") for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in sd
        depth = _RESNETS.get((*blocks, bottleneck))
        if depth is None:
            kind = "bottleneck" if bottleneck else "basic"
            raise CheckpointError(
                f"the ResNet has {list(blocks)} {kind} blocks per stage; clcli's ResNets are 18, 34 and 50 "
                "([2, 2, 2, 2] and [3, 4, 6, 3] basic, [3, 4, 6, 3] bottleneck)"
            )
        conv1 = sd["conv1.weight"]
        cifar = conv1.shape[-1] == 3
        cfg = BackboneConfig(name=f"resnet{depth}", cifar_stem=cifar, in_channels=int(conv1.shape[1]))
        return cfg, 32 if cifar else 224
    if "cls_token" in sd and "pos_embed" in sd and "patch_embed.weight" in sd:
        dim = int(sd["cls_token"].shape[-1])
        patch = sd["patch_embed.weight"]
        tokens = int(sd["pos_embed"].shape[1]) - 1
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise CheckpointError(f"pos_embed holds {tokens} patch positions, not a square grid")
        depth = _count(sd, r"^blocks\.(\d+)\.")
        hidden = int(sd["blocks.0.mlp.0.weight"].shape[0]) if "blocks.0.mlp.0.weight" in sd else 4 * dim
        n_heads = heads or layout.vit_heads.get(dim) or max(1, dim // 64)
        size = grid * int(patch.shape[-1])
        try:
            cfg = BackboneConfig(
                name="vit",
                image_size=size,
                patch_size=int(patch.shape[-1]),
                dim=dim,
                depth=depth,
                heads=n_heads,
                mlp_ratio=hidden / dim,
                in_channels=int(patch.shape[1]),
            )
        except ValueError as exc:
            raise ClcliError(f"the ViT in the file does not make a clcli ViT: {exc}") from None
        return cfg, size
    raise CheckpointError(
        f"the encoder's keys are neither a torchvision ResNet (conv1, layer1..4) nor a ViT (cls_token, pos_embed, "
        f"patch_embed, blocks); they start with {_listing(sorted({k.split('.')[0] for k in sd}))}"
    )


def map_checkpoint(obj: Any, layout: str, *, branch: str | None = None, heads: int | None = None) -> Imported:
    """Find the backbone of ``layout`` in ``obj`` (what :func:`read_checkpoint` returned) and check every key."""
    from clcli.models.backbones import build_backbone

    lay = LAYOUTS.get(layout)
    if lay is None:
        raise ClcliError(f"unknown checkpoint layout {layout!r}; known: {', '.join(LAYOUTS)}")
    explicit = branch is not None
    branch = branch or lay.default_branch
    if branch not in lay.branches:
        raise ClcliError(f"the {layout} layout has no branch {branch!r}; its branches: {', '.join(lay.branches)}")
    containers, prefixes = lay.branches[branch]
    sd, container = _state(obj, containers, lay, branch)
    if explicit and container is None and len(lay.branches) > 1 and containers[0] not in ("state_dict", "model"):
        raise CheckpointError(
            f"the file has no {containers[0]!r} entry for --branch {branch}: it holds one encoder, leave out --branch"
        )
    sd, prefix = _strip(sd, prefixes, lay)
    dropped = sorted(k for k in sd if k.startswith(lay.drop))
    sd = _rename({k: v for k, v in sd.items() if not k.startswith(lay.drop)})
    cfg, size = _infer(sd, lay, heads)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build_backbone(cfg).state_dict().items()}
    for key in expected:  # checkpoints from before PyTorch 0.4.1 have no batch-norm step counter
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros((), dtype=torch.long)
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    wrong = sorted(
        f"{k} (file {tuple(sd[k].shape)}, {cfg.name} {tuple(expected[k])})"
        for k in set(sd) & set(expected)
        if tuple(sd[k].shape) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} of another shape: {_listing(wrong, 4)}")
    if problems:
        raise CheckpointError(
            f"the {layout} checkpoint's encoder (keys under {prefix!r}) does not fit a clcli {cfg.name}: "
            + "; ".join(problems)
        )
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    return Imported(state, cfg, layout, branch, prefix, container, dropped, size)
