"""Import pretrained CLIP checkpoints in the public OpenAI / open_clip layout.

A file holds one state dict whose keys follow OpenAI's CLIP release (arXiv:2103.00020), which
open_clip keeps: the text tower (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N.*``, ``ln_final``, ``text_projection``), ``logit_scale`` and a
``visual.*`` image tower that is either

* a ViT (``visual.conv1`` patch projection without bias, ``class_embedding``,
  ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.*``, ``ln_post``, ``proj``), or
* the "modified ResNet" (three-convolution stem with an average pool, bottlenecks whose stride is
  an average pool before the third convolution and before the shortcut's 1x1 convolution, and an
  attention pool: the mean of the final feature map, with learned position embeddings, queries
  all positions through one multi-head attention).

Sizes are read from the tensors' shapes, as OpenAI's ``build_model`` does.  The towers are mapped
onto :class:`clcli.models.text.TextTransformer` and the image towers below; a file that is not
such a checkpoint fails with an error naming its missing and unexpected keys.

Formats: safetensors, and torch files loaded with ``weights_only=True`` (no code runs; an
open_clip training checkpoint's ``state_dict`` entry and a ``module.`` prefix are handled).  A
TorchScript archive (OpenAI's published ``.pt`` format) runs code from the file when loaded, so it
is loaded only when the caller passes ``trust_torchscript=True``.

One thing cannot be read from the weights: the MLP activation.  OpenAI's models (and open_clip's
``*-quickgelu`` ones) use ``x * sigmoid(1.702 x)``; open_clip's other models use GELU.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clcli.errors import CheckpointError
from clcli.models.text import ResidualAttentionBlock, TextTransformer

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "CLIPVisionTransformer",
    "ImportedCLIP",
    "ModifiedResNet",
    "build_clip",
    "load_clip",
    "read_state_dict",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Keys some exports carry that are not weights (OpenAI's TorchScript state dict; old open_clip buffers).
_IGNORED = {"input_resolution", "context_length", "vocab_size", "attn_mask", "visual.attn_mask"}
_TEXT_SIGNATURE = ("token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight")


# =============================================================================== image towers
class CLIPVisionTransformer(nn.Module):
    """CLIP's ViT image tower: patches -> [class] + tokens -> ln_pre -> blocks -> ln_post([class]) @ proj."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        activation: Literal["gelu", "quick_gelu"] = "quick_gelu",
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(self.grid * self.grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, 4.0, causal=False, activation=activation) for _ in range(layers)
        )
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))
        self.output_dim = output_dim

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # [B, W, g, g]
        b, w, gh, gw = x.shape
        if (gh, gw) != (self.grid, self.grid):
            raise ValueError(f"this CLIP ViT takes {self.image_size} px images, got {x.shape[-2:]} patches grid")
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, w)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj


class _Bottleneck(nn.Module):
    """CLIP's bottleneck: 1x1, 3x3, [avg-pool stride], 1x1 (x4); shortcut [avg-pool, 1x1, BN] when shapes change."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride))
            self.downsample.add_module("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(planes * 4))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class _AttentionPool(nn.Module):
    """Multi-head attention of the feature map's mean (plus position embeddings) over all positions."""

    def __init__(self, spatial: int, dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(spatial * spatial + 1, dim))
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, output_dim)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        d = c // self.heads

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, -1, self.heads, d).transpose(1, 2)

        q = split(self.q_proj(tokens[:, :1]))
        k, v = split(self.k_proj(tokens)), split(self.v_proj(tokens))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, 1, d]
        return self.c_proj(out.transpose(1, 2).reshape(b, c))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower (arXiv:2103.00020 section 2.4): 3-conv stem, anti-aliased strides, attention pool."""

    def __init__(self, *, layers: tuple[int, int, int, int], output_dim: int, heads: int, image_size: int, width: int):
        super().__init__()
        self.image_size = image_size
        half = width // 2
        self.conv1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        stages = []
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stage = [_Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * 4
            stage += [_Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = _AttentionPool(image_size // 32, width * 32, heads, output_dim)
        self.output_dim = output_dim

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


# ============================================================================== whole model
class ImportedCLIP(nn.Module):
    """An imported CLIP: ``visual`` image tower, ``text`` tower, ``logit_scale`` and CLIP's tokenizer.

    ``encode_image(x)`` and ``encode_text(texts)`` give L2-normalised embeddings; ``preprocess``
    describes the expected input (size, resize, bicubic interpolation, OpenAI's mean and std).
    """

    def __init__(self, visual: nn.Module, text: TextTransformer, tokenizer: Any = None) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(0.0), requires_grad=False)
        self.tokenizer = tokenizer
        self.image_size = int(visual.image_size)  # type: ignore[arg-type]
        self.preprocess = {
            "size": self.image_size,
            "resize": self.image_size,
            "interpolation": "bicubic",
            "mean": OPENAI_MEAN,
            "std": OPENAI_STD,
        }

    def features(self, x: Tensor) -> Tensor:
        """Image embeddings before normalisation (what kNN / linear evaluation use)."""
        return self.visual(x)

    def embed(self, x: Tensor) -> Tensor:
        return self.encode_image(x)

    def encode_image(self, x: Tensor) -> Tensor:
        return F.normalize(self.visual(x).float(), dim=-1)

    def tokenize(self, texts: list[str]) -> Tensor:
        if self.tokenizer is None:
            raise CheckpointError("this imported CLIP has no tokenizer: give its BPE vocabulary file (--vocab)")
        ids = self.tokenizer(list(texts), self.text.context_length)
        longest = int(self.text.eot_positions(ids).max()) + 1 if len(ids) else 1
        return ids[:, :longest]

    def encode_text_ids(self, ids: Tensor) -> Tensor:
        return F.normalize(self.text(ids.to(self.logit_scale.device)).float(), dim=-1)

    def encode_text(self, texts: list[str]) -> Tensor:
        return self.encode_text_ids(self.tokenize(texts))

    def logit_scale_value(self) -> float:
        return float(self.logit_scale.exp().clamp(max=100.0))


# ============================================================================ reading files
def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def read_state_dict(path: str | Path, *, trust_torchscript: bool = False) -> dict[str, Tensor]:
    """The tensors of a safetensors file, a torch state-dict file or (when trusted) a TorchScript archive."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) >= 8 and not zipfile.is_zipfile(path) and head[8:9] == b"{":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a broken file is the user's input
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    if _is_torchscript(path):
        if not trust_torchscript:
            raise CheckpointError(
                f"{path} is a TorchScript archive (OpenAI's published format); loading it runs code stored in the "
                "file. Pass --trust-torchscript if you trust its source, or convert it to a state dict / safetensors"
            )
        try:
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"cannot load the TorchScript archive {path}: {exc}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles with code, truncated files, other formats
        raise CheckpointError(
            f"{path} is neither safetensors nor a torch state dict that loads with weights_only=True: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return dict(obj)


def _count(sd: dict[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def _listing(keys: list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more if keys else "none"


def _not_clip(where: str, sd: dict[str, Tensor], missing: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{where} is not an OpenAI / open_clip CLIP checkpoint: missing keys: {_listing(missing)}; "
        f"unexpected keys: {_listing([k for k in sd if not k.startswith('visual.') and k not in _TEXT_SIGNATURE])}"
    )


def _block_keys(src: str, dst: str) -> dict[str, str]:
    pairs = {
        "ln_1": "norm1",
        "ln_2": "norm2",
        "attn.out_proj": "attn.proj",
        "mlp.c_fc": "mlp.0",
        "mlp.c_proj": "mlp.2",
    }
    out = {f"{src}attn.in_proj_weight": f"{dst}attn.qkv.weight", f"{src}attn.in_proj_bias": f"{dst}attn.qkv.bias"}
    for a, b in pairs.items():
        out[f"{src}{a}.weight"] = f"{dst}{b}.weight"
        out[f"{src}{a}.bias"] = f"{dst}{b}.bias"
    return out


def build_clip(
    sd: dict[str, Tensor],
    *,
    activation: Literal["gelu", "quick_gelu"] = "quick_gelu",
    tokenizer: Any = None,
    where: str = "the checkpoint",
) -> ImportedCLIP:
    """An :class:`ImportedCLIP` holding the weights of an OpenAI / open_clip state dict ``sd``."""
    sd = {k: v for k, v in sd.items() if k not in _IGNORED}
    missing = [k for k in _TEXT_SIGNATURE if k not in sd]
    is_vit = "visual.class_embedding" in sd
    is_resnet = "visual.attnpool.positional_embedding" in sd
    if not (is_vit or is_resnet):
        missing.append("visual.class_embedding (ViT) or visual.attnpool.positional_embedding (ResNet)")
    if missing:
        raise _not_clip(where, sd, missing)

    embed_dim = sd["text_projection"].shape[1]
    width = sd["ln_final.weight"].shape[0]
    text = TextTransformer(
        vocab_size=sd["token_embedding.weight"].shape[0],
        context_length=sd["positional_embedding"].shape[0],
        width=width,
        layers=_count(sd, r"transformer\.resblocks\.(\d+)\."),
        heads=max(width // 64, 1),
        embed_dim=embed_dim,
        eot_id=sd["token_embedding.weight"].shape[0] - 1,
        activation=activation,
    )
    mapping: dict[str, str] = {
        "token_embedding.weight": "text.token_embedding.weight",
        "positional_embedding": "text.position_embedding",
        "ln_final.weight": "text.norm.weight",
        "ln_final.bias": "text.norm.bias",
        "logit_scale": "logit_scale",
    }
    for i in range(len(text.blocks)):
        mapping.update(_block_keys(f"transformer.resblocks.{i}.", f"text.blocks.{i}."))
    transposed = {"text_projection": "text.projection.weight"}

    visual: nn.Module
    if is_vit:
        vw = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        visual = CLIPVisionTransformer(
            image_size=patch * grid,
            patch_size=patch,
            width=vw,
            layers=_count(sd, r"visual\.transformer\.resblocks\.(\d+)\."),
            heads=max(vw // 64, 1),
            output_dim=sd["visual.proj"].shape[1] if "visual.proj" in sd else embed_dim,
            activation=activation,
        )
        for name in ("conv1.weight", "class_embedding", "positional_embedding", "proj"):
            mapping[f"visual.{name}"] = f"visual.{name}"
        for ln in ("ln_pre", "ln_post"):
            mapping[f"visual.{ln}.weight"] = f"visual.{ln}.weight"
            mapping[f"visual.{ln}.bias"] = f"visual.{ln}.bias"
        for i in range(len(visual.blocks)):
            mapping.update(_block_keys(f"visual.transformer.resblocks.{i}.", f"visual.blocks.{i}."))
    else:
        layers = tuple(_count(sd, rf"visual\.layer{b}\.(\d+)\.") for b in (1, 2, 3, 4))
        rw = sd["visual.layer1.0.conv1.weight"].shape[0] if "visual.layer1.0.conv1.weight" in sd else 64
        spatial = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        visual = ModifiedResNet(
            layers=layers,  # type: ignore[arg-type]
            output_dim=sd["visual.attnpool.c_proj.weight"].shape[0] if "visual.attnpool.c_proj.weight" in sd else 0,
            heads=rw * 32 // 64,
            image_size=spatial * 32,
            width=rw,
        )
        for name in visual.state_dict():
            mapping[f"visual.{name}"] = f"visual.{name}"

    model = ImportedCLIP(visual, text, tokenizer)
    target = model.state_dict()
    sources = {**mapping, **transposed}
    missing = [k for k in sources if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in sources]
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match the CLIP layout its shapes suggest "
            f"({'ViT' if is_vit else 'ResNet'} image tower): missing keys: {_listing(missing)}; "
            f"unexpected keys: {_listing(unexpected)}"
        )
    new_state: dict[str, Tensor] = {}
    for src, dst in mapping.items():
        if src in sd:
            new_state[dst] = sd[src]
    for src, dst in transposed.items():
        new_state[dst] = sd[src].t()
    for k, v in target.items():  # BatchNorm counters some exports leave out, the fixed eot buffer
        new_state.setdefault(k, v)
    bad = [k for k, v in new_state.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if bad:
        details = ", ".join(f"{k} {tuple(new_state[k].shape)} vs {tuple(target[k].shape)}" for k in bad[:4])
        raise CheckpointError(f"{where}: tensor shapes do not fit the inferred CLIP model: {details}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in new_state.items()}, strict=True)
    return model.eval()


def load_clip(
    path: str | Path,
    *,
    vocab: str | Path | None = None,
    trust_torchscript: bool = False,
    activation: Literal["gelu", "quick_gelu"] = "quick_gelu",
) -> ImportedCLIP:
    """Read a checkpoint file and build the model; ``vocab`` is CLIP's BPE file (found in open_clip if omitted)."""
    from clcli.text.tokenizers import ClipTokenizer, default_clip_vocab

    sd = read_state_dict(path, trust_torchscript=trust_torchscript)
    vocab_path = Path(vocab) if vocab else default_clip_vocab()
    tokenizer = ClipTokenizer(vocab_path) if vocab_path is not None else None
    model = build_clip(sd, activation=activation, tokenizer=tokenizer, where=str(path))
    if tokenizer is not None and tokenizer.vocab_size != model.text.vocab_size:
        raise CheckpointError(
            f"the vocabulary {vocab_path} has {tokenizer.vocab_size} tokens but the checkpoint's text tower "
            f"{model.text.vocab_size}"
        )
    return model
