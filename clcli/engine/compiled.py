"""``trainer.compile``: the method's networks compiled with :func:`torch.compile`.

Each direct sub-module of the method that holds parameters (backbones, heads, predictors, their
momentum copies) is compiled in place with :meth:`torch.nn.Module.compile`, so parameter names,
state dicts and checkpoints stay as they are, and the method's own code (losses, queues, hooks)
runs as written.  The first steps are slow while the graphs compile; a change of a network's mode
(training, evaluation) or input shape compiles it again.
"""

from __future__ import annotations

from torch import nn


def compile_networks(method: nn.Module) -> list[str]:
    """Compile every direct sub-module of ``method`` that has parameters, in place; their names."""
    names = []
    for name, child in method.named_children():
        if next(child.parameters(), None) is not None:
            child.compile()
            names.append(name)
    return names
