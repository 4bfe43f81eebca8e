"""InvaSpread: invariant and spreading instance features (Ye et al. 2019, arXiv:1904.03436).

End-to-end instance discrimination without a memory bank: a batch of B images, two augmented
views each, one shared encoder (backbone + a linear layer to a 128-d L2-normalised embedding) run
over the 2B views at once.  The loss (:func:`~clcli.losses.invaspread_loss`) makes every one of the
2B embeddings an anchor: the partner view must be recognised as the anchor's instance (P_a, the
invariance term) and every other instance must not be (Σ log(1 − P_ak), the spreading term), with
both probabilities normalised over the anchor's 2B − 1 other embeddings.

How the loss is read here: the paper writes it for the B images and their augmented copies in a
Siamese network (its eqs. 2-5); the project's METHODS.md, like the official code, makes all 2B
embeddings anchors, normalises each anchor's probabilities over its 2B − 1 other embeddings of
both views, excludes only the anchor and its partner from the spreading sum, and divides by 2B.
The official code computes the products f_aᵀf_k with the non-anchor factor taken from ``.data``,
so no gradient flows through it; that is ``detach_others: true`` (the default), while
``detach_others: false`` differentiates through both factors, as the equation reads.  The code's
optional weight on the negative sum (``--batch-m``) defaults to 1 there and is not exposed.
Across processes the embeddings are gathered with gradient (as SimCLR's), so the anchors see the
global batch; gradient accumulation does not add negatives: each micro-batch is its own contrast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from clcli import dist
from clcli.errors import RecipeError
from clcli.losses import invaspread_loss
from clcli.methods.base import Batch, BuildContext, Method, StepOutput
from clcli.models.heads import MLP
from clcli.recipe import MethodConfig, Recipe
from clcli.recipe_checks import MemoryItems, SizeContext, Temperature, mlp_params, views_problem


class InvaSpreadConfig(MethodConfig):
    """InvaSpread's settings: the embedding size, τ = 0.1, and whether the non-anchor side is detached."""

    name: str = "invaspread"
    embedding_dim: int = Field(128, ge=1, description="size of the L2-normalised embedding (a linear layer)")
    temperature: Temperature = 0.1
    detach_others: bool = Field(
        True, description="no gradient through the non-anchor factor of each product (the official code)"
    )

    def recipe_problems(self, recipe: Recipe) -> list[tuple[str, str]]:
        out = views_problem(recipe, "invaspread", exactly=2)
        if not out and len({g.size for g in recipe.views.groups}) > 1:
            out.append(("views.groups", "invaspread's two views must have the same size"))
        return out

    def memory_items(self, recipe: Recipe, sizes: SizeContext) -> MemoryItems:
        b = sizes.batch_size
        return {
            "head (method.embedding_dim)": (mlp_params([sizes.feature_dim, self.embedding_dim]), "param"),
            "similarity matrix ((2 x trainer.batch_size)^2)": ((2 * b) ** 2, "work"),
        }


class InvaSpread(Method):
    config_class = InvaSpreadConfig
    paper = "arXiv:1904.03436"

    def __init__(self, cfg: InvaSpreadConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: InvaSpreadConfig = cfg
        views = sum(g.count for g in ctx.recipe.views.groups)
        if views != 2:
            raise RecipeError(
                f"invaspread uses exactly two augmented views per image, but the recipe makes {views}; "
                "set views.groups to one group with count: 2"
            )
        self.backbone = ctx.build_backbone()
        self.head = MLP([self.backbone.feature_dim, cfg.embedding_dim])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised 128-d embedding (in fp32)."""
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        if len(batch.views) != 2:
            raise RecipeError(f"invaspread uses exactly two views per image, the batch has {len(batch.views)}")
        if batch.views[0].shape != batch.views[1].shape:
            raise RecipeError("invaspread's two views must have the same size")
        # one pass over both views, as the official code does: BN sees the 2B images together
        f = self.embed(torch.cat(batch.views, dim=0))
        f1, f2 = f.chunk(2)
        f1, f2 = dist.gather_with_grad(f1), dist.gather_with_grad(f2)
        loss = invaspread_loss(f1, f2, self.cfg.temperature, detach_others=self.cfg.detach_others)
        positive = (f1.detach() * f2.detach()).sum(dim=1).mean()
        return StepOutput(loss, {"positive_similarity": positive}, health={"embedding": f.detach()})
