"""clcli: contrastive and self-supervised representation learning, as a tool and a library.

Library entry points::

    from clcli import load_recipe, pretrain, load_backbone
    recipe = load_recipe("simclr", ["trainer.epochs=1"])
    pretrain(recipe, "runs/simclr")
    encoder = load_backbone("backbone.safetensors")   # a ready nn.Module, features = encoder(x)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_backbone", "load_recipe", "pretrain"]


def __getattr__(name: str) -> Any:  # imported lazily so that `clcli --help` starts fast
    if name == "load_backbone":
        from clcli.export import load_backbone

        return load_backbone
    if name == "load_recipe":
        from clcli.recipe import load_recipe

        return load_recipe
    if name == "pretrain":
        from clcli.train import pretrain

        return pretrain
    raise AttributeError(f"module 'clcli' has no attribute {name!r}")
