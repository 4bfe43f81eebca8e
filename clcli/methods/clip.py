"""CLIP: contrastive language-image pre-training (Radford et al. 2021, arXiv:2103.00020).

An image tower (any backbone, then a bias-free linear projection) and a text tower (a causal
Transformer over byte-level BPE tokens, its feature at the end-of-text token, linearly projected)
map images and their captions into one space; the symmetric cross-entropy over the batch's
image-text similarities, scaled by a learnable exp(t) (t initialised to log(1/0.07), the scale
clipped at 100), pulls each pair together against every other pairing of the batch.  Across
processes both embeddings are gathered *with* gradient, so the negatives are the global batch's.
Gradient accumulation does not add negatives: each micro-batch is its own contrast.

Captions come from the data (a text column, or a ``.txt`` beside each image) or, for a labelled
set without captions, from prompt templates over the class names (``captions`` and
``caption_templates``; with several templates each image gets one, chosen from the step and its
sample index, so resuming is exact).  The tokenizer is a byte-level BPE trained on the captions
when the method is built for training and kept in the state dict (``tokenizer_json``), so a run
folder alone rebuilds it for ``clcli zeroshot``.

``text_tower: hf`` is the locked-text-tower variant of LiT (Zhai et al. 2022, arXiv:2111.07991):
the text side is a frozen pretrained sentence encoder from a local folder (its weights stay out of
the checkpoints; the recipe names the folder), and only the image tower learns, towards the
encoder's embedding space.  Embeddings of repeated captions are cached, so templated captions
cost one encoder pass each.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from clcli import dist
from clcli.errors import ClcliError, DataError
from clcli.losses import clip_contrastive
from clcli.methods.base import Batch, BuildContext, Method, StepOutput
from clcli.models.text import TextTransformer
from clcli.recipe import MethodConfig, Recipe
from clcli.recipe_checks import MAX_BLOCKS, MemoryItems, SizeContext, Temperature, mlp_params
from clcli.text.templates import fill, load_templates
from clcli.text.tokenizers import CaptionTokenizer, pack_tokens

# The trained tokenizer's special tokens are its first three ids.
PAD_ID, SOT_ID, EOT_ID = 0, 1, 2


class CLIPConfig(MethodConfig):
    """CLIP's settings.  Paper defaults (ViT-B/32): 512-d joint space, text Transformer of width 512,
    12 layers, 8 heads, context 77, a 49,152-merge BPE (vocabulary 49,408), temperature 0.07
    learnable, logit scale clipped at 100."""

    name: str = "clip"
    embed_dim: int = Field(512, ge=1, description="dimension of the joint image-text space")
    # text tower
    text_tower: Literal["transformer", "hf"] = Field(
        "transformer", description="transformer: trained from scratch; hf: a locked Hugging Face encoder (LiT)"
    )
    context_length: int = Field(77, ge=4, le=65536)
    vocab_size: int = Field(49408, ge=259, description="token embeddings; the trained BPE stops at this size")
    text_width: int = Field(512, ge=1)
    text_layers: int = Field(12, ge=1, le=MAX_BLOCKS)
    text_heads: int = Field(8, ge=1)
    text_mlp_ratio: float = Field(4.0, gt=0, le=1024)
    text_activation: Literal["gelu", "quick_gelu"] = "gelu"
    tokenizer_captions: int = Field(
        200_000, ge=1, description="at most this many training captions are read to train the BPE tokenizer"
    )
    text_encoder: str | None = Field(
        None, description="hf: a local model folder, or python:MODULE for a package that ships one"
    )
    text_max_length: int = Field(64, ge=4, le=65536, description="hf: tokens per caption for the locked encoder")
    text_cache_size: int = Field(100_000, ge=0, description="hf: caption embeddings kept in memory (0: none)")
    # captions
    captions: Literal["auto", "text", "templates"] = Field(
        "auto", description="auto: the data's caption when it has one, else a template over the class name"
    )
    caption_templates: str | list[str] = Field(
        "a photo of a {}.", description="template set name (simple, cifar10, imagenet), file, template or list"
    )
    # temperature
    init_temperature: Temperature = 0.07
    learn_temperature: bool = True
    max_logit_scale: float = Field(100.0, gt=0, le=10_000, description="exp(t) is clipped at this")
    # zero-shot
    zeroshot_templates: str = Field(
        "cifar10",
        description="template set (simple, cifar10, imagenet), file or template used by default for zero-shot",
    )

    @field_validator("caption_templates", "zeroshot_templates")
    @classmethod
    def _templates_exist(cls, v: str | list[str]) -> str | list[str]:
        try:
            load_templates(v)
        except ClcliError as exc:
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _check(self) -> CLIPConfig:
        if self.text_tower == "transformer" and self.text_width % self.text_heads != 0:
            raise ValueError(f"text_width ({self.text_width}) must be divisible by text_heads ({self.text_heads})")
        if self.text_tower == "hf" and not self.text_encoder:
            raise ValueError("text_tower 'hf' needs text_encoder: a local model folder or python:MODULE")
        if int(self.text_width * self.text_mlp_ratio) < 1:
            raise ValueError(f"text_mlp_ratio ({self.text_mlp_ratio:g}) leaves the MLP no hidden unit")
        return self

    def memory_items(self, recipe: Recipe, sizes: SizeContext) -> MemoryItems:
        w, b = self.text_width, sizes.batch_size
        items: MemoryItems = {
            "image projection (method.embed_dim)": (mlp_params([sizes.feature_dim, self.embed_dim]), "param"),
            "logits (2 x trainer.batch_size^2)": (2 * b * b, "work"),
        }
        if self.text_tower == "transformer":
            hidden = int(w * self.text_mlp_ratio)
            block = 4 * w * w + 2 * w * hidden
            tower = (self.vocab_size + self.context_length) * w + self.text_layers * block + w * self.embed_dim
            items["text tower (vocab_size, context_length, text_width, text_layers)"] = (tower, "param")
            items["caption tokens through the tower (trainer.batch_size x context_length x text_width)"] = (
                b * self.context_length * w,
                "work",
            )
        return items


def _as_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)


class _BytesState(nn.Module):
    """A uint8 buffer whose length comes from the checkpoint being loaded (e.g. a tokenizer's JSON)."""

    def __init__(self, data: bytes = b"") -> None:
        super().__init__()
        self.register_buffer("data", _as_tensor(data))

    def set(self, data: bytes) -> None:
        self.data = _as_tensor(data).to(self.data.device)

    def get(self) -> bytes:
        return self.data.cpu().numpy().tobytes()

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + "data"
        if key not in state_dict:
            missing_keys.append(key)
            return
        value = state_dict[key]
        if value.dtype != torch.uint8 or value.dim() != 1:
            error_msgs.append(f"{key}: expected a 1-d uint8 tensor, got {value.dtype} {tuple(value.shape)}")
            return
        self.data = value.detach().clone().to(self.data.device)


class CLIP(Method):
    config_class = CLIPConfig
    needs_text = True
    has_text_tower = True
    paper = "arXiv:2103.00020"

    @classmethod
    def check_external(cls, cfg: Any) -> None:
        """A locked text tower's folder is found (and a ``python:`` hook allowed to import) before the data."""
        if cfg.text_tower == "hf" and cfg.text_encoder:
            from clcli.text.hf import resolve_encoder_path

            resolve_encoder_path(cfg.text_encoder)

    def __init__(self, cfg: CLIPConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: CLIPConfig = cfg
        self.class_names = list(ctx.class_names) if ctx.class_names else None
        self.templates = load_templates(cfg.caption_templates)
        self.backbone = ctx.build_backbone()
        self.encoder: Any = None
        self.text: TextTransformer | None = None
        if cfg.text_tower == "hf":
            from clcli.text.hf import SentenceEncoder

            self.encoder = SentenceEncoder(cfg.text_encoder or "", max_length=cfg.text_max_length)
            if cfg.embed_dim != self.encoder.dim:
                raise ClcliError(
                    f"method.embed_dim ({cfg.embed_dim}) must equal the locked text encoder's dimension "
                    f"({self.encoder.dim}); set method.embed_dim={self.encoder.dim}"
                )
            self._text_cache: dict[str, Tensor] = {}
        else:
            self.text = TextTransformer(
                vocab_size=cfg.vocab_size,
                context_length=cfg.context_length,
                width=cfg.text_width,
                layers=cfg.text_layers,
                heads=cfg.text_heads,
                embed_dim=cfg.embed_dim,
                eot_id=EOT_ID,
                mlp_ratio=cfg.text_mlp_ratio,
                activation=cfg.text_activation,
            )
        self.image_projection = nn.Linear(self.backbone.feature_dim, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=self.backbone.feature_dim**-0.5)
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / cfg.init_temperature)), requires_grad=cfg.learn_temperature
        )
        self.tokenizer_json = _BytesState()
        self._tokenizer: CaptionTokenizer | None = None
        self._tokenizer_tensor: Tensor | None = None
        self._ids_cache: dict[str, list[int]] = {}
        if self.text is not None:
            captions = self._tokenizer_corpus(ctx)
            if captions:
                tok = CaptionTokenizer.train(captions, cfg.vocab_size)
                self._check_tokenizer(tok)
                self.tokenizer_json.set(tok.to_json().encode())

    # -- captions and tokenizer -----------------------------------------------------------
    def _template_captions(self) -> list[str]:
        if not self.class_names:
            return []
        return [fill(t, name) for t in self.templates for name in self.class_names]

    def _tokenizer_corpus(self, ctx: BuildContext) -> list[str]:
        """The captions the BPE is trained on: the data's captions, then the templated class names."""
        cfg = self.cfg
        captions: list[str] = []
        source = ctx.train_source
        if source is not None and cfg.captions in ("auto", "text"):
            for i in range(min(len(source), cfg.tokenizer_captions)):
                text = source.text(i)
                if text:
                    captions.append(text)
            if not captions and cfg.captions == "text":
                raise DataError(
                    f"method.captions is 'text' but {source.spec} has no captions (no text column, no .txt files); "
                    "use method.captions=templates for a labelled set"
                )
        if cfg.captions in ("auto", "templates"):
            captions += self._template_captions()
        if source is not None and not captions:
            raise DataError(
                f"CLIP needs captions: {source.spec} has no text column, no .txt captions and no labels to fill "
                "prompt templates with"
            )
        return captions

    def _check_tokenizer(self, tok: CaptionTokenizer) -> None:
        if (tok.pad_id, tok.sot_id, tok.eot_id) != (PAD_ID, SOT_ID, EOT_ID):
            raise ClcliError("the caption tokenizer's special tokens must be ids 0, 1, 2 (<pad>, <sot>, <eot>)")
        if tok.vocab_size > self.cfg.vocab_size:
            raise ClcliError(f"the tokenizer has {tok.vocab_size} tokens, more than method.vocab_size")

    @property
    def tokenizer(self) -> CaptionTokenizer:
        data = self.tokenizer_json.data
        if self._tokenizer is None or self._tokenizer_tensor is not data:
            if data.numel() == 0:
                raise ClcliError(
                    "the CLIP caption tokenizer has not been trained: the method was built without training data "
                    "(a streaming source with no class names) and no checkpoint was loaded"
                )
            tok = CaptionTokenizer.from_json(self.tokenizer_json.get().decode())
            self._check_tokenizer(tok)
            self._tokenizer, self._tokenizer_tensor = tok, data
            self._ids_cache = {}
        return self._tokenizer

    def batch_captions(self, batch: Batch, step: int) -> list[str]:
        """One caption per image: the data's own, else a template over its class name (see ``captions``)."""
        mode = self.cfg.captions
        texts = batch.text if batch.text is not None else [None] * batch.size
        labels = batch.label.tolist()
        indices = batch.index.tolist()
        out: list[str] = []
        for text, label, index in zip(texts, labels, indices, strict=True):
            if mode != "templates" and text:
                out.append(text)
                continue
            if mode == "text":
                raise DataError("method.captions is 'text' but an image of the batch has no caption")
            if label < 0 or not self.class_names or label >= len(self.class_names):
                raise DataError(
                    "CLIP needs a caption for every image: this image has no caption and no label to fill a "
                    "prompt template with"
                )
            k = 0 if len(self.templates) == 1 else (max(index, 0) * 1_000_003 + step * 7_919) % len(self.templates)
            out.append(fill(self.templates[k], self.class_names[label]))
        return out

    # -- towers ---------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids ``[N, T]``, cut after the longest row's end-of-text token (exact under the causal mask)."""
        tok = self.tokenizer
        rows = []
        for t in texts:
            ids = self._ids_cache.get(t)
            if ids is None:
                ids = tok.encode(t)
                if len(self._ids_cache) < 100_000:
                    self._ids_cache[t] = ids
            rows.append(ids)
        ids = pack_tokens(rows, self.cfg.context_length, SOT_ID, EOT_ID, PAD_ID)
        longest = min(max((len(r) for r in rows), default=0) + 2, self.cfg.context_length)
        return ids[:, :longest]

    def _encode_hf(self, texts: list[str]) -> Tensor:
        device = self.logit_scale.device
        self.encoder.to(device)
        cache = self._text_cache
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        fresh: dict[str, Tensor] = {}
        if missing:
            emb = self.encoder.encode(missing)
            fresh = dict(zip(missing, emb, strict=True))
            for t, e in fresh.items():
                if len(cache) < self.cfg.text_cache_size:
                    cache[t] = e
        return torch.stack([cache[t] if t in cache else fresh[t] for t in texts]).to(device)

    def text_embed(self, texts: list[str]) -> Tensor:
        """Unnormalised text embeddings ``[N, embed_dim]`` (the locked encoder's are normalised)."""
        if self.text is None:
            return self._encode_hf(texts)
        ids = self.tokenize(texts).to(self.logit_scale.device)
        return self.text(ids)

    def image_embed(self, x: Tensor) -> Tensor:
        return self.image_projection(self.backbone(x))

    # -- training -------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: int) -> StepOutput:
        if len(batch.views) != 1:
            raise ValueError(f"CLIP uses one view per image (a random crop), the recipe makes {len(batch.views)}")
        captions = self.batch_captions(batch, step)
        image = self.image_embed(batch.views[0])
        text = self.text_embed(captions)
        image = dist.gather_with_grad(image)
        text = dist.gather_with_grad(text) if text.requires_grad else dist.gather_no_grad(text)
        loss = clip_contrastive(image, text, self.logit_scale, self.cfg.max_logit_scale)
        scale = self.logit_scale.detach().exp().clamp(max=self.cfg.max_logit_scale)
        return StepOutput(loss, {"logit_scale": scale}, health={"embedding": image.detach()})

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        # keep t in [0, log(max)] as CLIP's code does, so the clip in the loss never hides a drifting parameter
        self.logit_scale.clamp_(0.0, math.log(self.cfg.max_logit_scale))

    def schedule_summary(self) -> dict[str, str]:
        cfg = self.cfg
        if self.text is not None:
            vocab = f"{self.tokenizer.vocab_size} tokens" if self.tokenizer_json.data.numel() else "not trained"
            text = (
                f"Transformer {cfg.text_layers} x {cfg.text_width} ({cfg.text_heads} heads), context "
                f"{cfg.context_length}, byte-level BPE trained on the captions ({vocab})"
            )
        else:
            text = f"locked {self.encoder.path} ({self.encoder.dim}-d, LiT); cached caption embeddings"
        templates = f"{len(self.templates)} template(s), e.g. {self.templates[0]!r}"
        return {
            "text tower": text,
            "captions": f"{cfg.captions}; {templates}",
            "temperature": (
                f"{cfg.init_temperature:g} ({'learnable' if cfg.learn_temperature else 'fixed'}), "
                f"scale clipped at {cfg.max_logit_scale:g}"
            ),
        }

    # -- evaluation -----------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.image_embed(x), dim=-1)

    def encode_image(self, x: Tensor) -> Tensor:
        """L2-normalised image embeddings ``[B, embed_dim]``."""
        return F.normalize(self.image_embed(x).float(), dim=-1)

    def encode_text(self, texts: list[str]) -> Tensor:
        """L2-normalised text embeddings ``[N, embed_dim]``."""
        return F.normalize(self.text_embed(list(texts)).float(), dim=-1)

    def logit_scale_value(self) -> float:
        return float(self.logit_scale.detach().exp().clamp(max=self.cfg.max_logit_scale))

    def zeroshot_templates(self) -> str:
        return self.cfg.zeroshot_templates

    def extra_metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"text_tower": self.cfg.text_tower, "embed_dim": self.cfg.embed_dim}
        if self.encoder is not None:
            meta["text_encoder"] = str(self.encoder.path)
            meta["text_encoder_digest"] = self.encoder.digest
        return meta
