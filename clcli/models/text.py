"""CLIP's text tower: a causal Transformer over BPE tokens (Radford et al. 2021, arXiv:2103.00020).

Token and learned position embeddings, ``layers`` pre-norm residual blocks (LayerNorm ->
multi-head self-attention under a causal mask -> residual, LayerNorm -> MLP -> residual), a final
LayerNorm; the sentence feature is the activation at the end-of-text token, linearly projected to
the joint image-text space (CLIP section 2.4).  Because of the causal mask no token attends to
anything after it, so padding after the end-of-text token never changes the feature.

:class:`ResidualAttentionBlock` is also the block of the CLIP vision transformer that
:mod:`clcli.models.clip_import` builds for imported checkpoints; ``activation`` chooses between
GELU and the sigmoid approximation ``x * sigmoid(1.702 x)`` ("QuickGELU") that OpenAI's released
models were trained with.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QuickGELU", "ResidualAttentionBlock", "SelfAttention", "TextTransformer"]

Activation = Literal["gelu", "quick_gelu"]


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the GELU approximation of OpenAI's CLIP models."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(kind: str) -> nn.Module:
    if kind == "gelu":
        return nn.GELU()
    if kind == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"activation must be 'gelu' or 'quick_gelu', got {kind!r}")


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused query/key/value projection (``qkv``) and ``proj``.

    The ``qkv`` weight stacks the query, key and value projections ``[3 * dim, dim]`` in that order,
    the layout of :class:`torch.nn.MultiheadAttention`'s ``in_proj_weight``.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"width ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the tokens of ``x`` ``[B, T, dim]`` (each token only to earlier ones when causal)."""
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` (``mlp``: Linear, act, Linear)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        *,
        causal: bool = False,
        activation: Activation = "gelu",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, heads, causal=causal)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), _activation(activation), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """The CLIP text encoder (arXiv:2103.00020, section 2.4): token ids ``[B, T]`` -> ``[B, embed_dim]``.

    ``vocab_size`` token embeddings and ``context_length`` learned position embeddings of
    ``width``; ``layers`` causal pre-norm blocks of ``heads`` heads; a final LayerNorm; the feature
    is taken at the first position holding ``eot_id`` (the end-of-text token; a sequence without
    one uses its last position) and projected by a bias-free Linear to ``embed_dim``.  The output
    is not normalised.  Initialisation follows CLIP's released code: token embeddings N(0, 0.02),
    position embeddings N(0, 0.01), attention and MLP weights scaled by depth, projection
    N(0, width^-0.5).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        context_length: int,
        width: int,
        layers: int,
        heads: int,
        embed_dim: int,
        eot_id: int,
        mlp_ratio: float = 4.0,
        activation: Activation = "gelu",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not 0 <= eot_id < vocab_size:
            raise ValueError(f"the end-of-text id {eot_id} is outside the vocabulary of {vocab_size}")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width = width
        self.embed_dim = embed_dim
        self.eot_id = eot_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, causal=True, activation=activation, eps=eps)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width, eps=eps)
        self.projection = nn.Linear(width, embed_dim, bias=False)
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        w = self.width
        proj_std = (w**-0.5) * ((2 * max(layers, 1)) ** -0.5)
        attn_std = w**-0.5
        fc_std = (2 * w) ** -0.5
        for block in self.blocks:
            assert isinstance(block, ResidualAttentionBlock)
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.proj.bias)
            nn.init.normal_(block.mlp[0].weight, std=fc_std)
            nn.init.zeros_(block.mlp[0].bias)
            nn.init.normal_(block.mlp[2].weight, std=proj_std)
            nn.init.zeros_(block.mlp[2].bias)
        nn.init.normal_(self.projection.weight, std=w**-0.5)

    def eot_positions(self, ids: Tensor) -> Tensor:
        """Index of the first end-of-text token in each row of ``ids`` (the last index when absent)."""
        is_eot = ids == self.eot_id
        first = is_eot.int().argmax(dim=1)
        return torch.where(is_eot.any(dim=1), first, torch.full_like(first, ids.shape[1] - 1))

    def forward(self, ids: Tensor) -> Tensor:
        """``ids`` int64 ``[B, T]`` (T <= context_length) -> unnormalised text embeddings ``[B, embed_dim]``."""
        if ids.dim() != 2:
            raise ValueError(f"token ids must be [batch, length], got shape {tuple(ids.shape)}")
        t = ids.shape[1]
        if t > self.context_length:
            raise ValueError(f"{t} tokens exceed the context length {self.context_length}")
        x = self.token_embedding(ids) + self.position_embedding[:t]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eot_positions(ids)]
        return self.projection(pooled)
