"""``clcli import``: published self-supervised checkpoints in, as clcli backbone files.

Also the options the evaluation commands take for such a checkpoint (``--from``, ``--trust-pickle``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clcli.cli_options import JsonOpt
from clcli.cli_report import emit, user_errors

LAYOUT_NAMES = "moco, mocov3, swav, dino, byol, simclr, simsiam or torchvision"

FromOpt = Annotated[
    str | None,
    typer.Option(
        "--from",
        help=f"The layout of a published --checkpoint FILE ({LAYOUT_NAMES}): its backbone is mapped onto clcli's "
        "and evaluated (same as `clcli import` first).",
    ),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow a torch checkpoint that does not load with weights_only=True (a pickle holding Python objects "
        "beyond tensors). Reading it runs code stored in the file: use only files from a source you trust.",
    ),
]


@user_errors
def import_(
    file: Annotated[Path, typer.Argument(help="The published checkpoint (.pth, .pth.tar, .pt or .safetensors).")],
    layout: Annotated[str, typer.Option("--from", help=f"Its layout: {LAYOUT_NAMES}.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The backbone file to write, e.g. backbone.safetensors.")],
    branch: Annotated[
        str | None,
        typer.Option(
            "--branch",
            help="Which encoder of the file: dino teacher|student, mocov3 base|momentum, byol online|target "
            "[default: the first].",
        ),
    ] = None,
    heads: Annotated[
        int | None,
        typer.Option(
            "--heads", min=1, help="A ViT's attention heads (not stored in its weights) [default: the release's]."
        ),
    ] = None,
    trust_pickle: TrustPickleOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Map a published self-supervised checkpoint onto a clcli backbone and write it as safetensors.

    Takes the official releases' layouts: MoCo v1/v2 (module.encoder_q), MoCo v3 (module.base_encoder),
    SwAV (module.*, heads dropped), DINO (teacher/student backbone, or the backbone-only files), SimSiam
    (module.encoder), the common PyTorch ports of BYOL and SimCLR, and torchvision-named ResNets. Every key
    of the backbone must be found with its shape. The file loads with clcli.load_backbone and evaluates with
    `clcli eval knn --checkpoint FILE --data SPEC`.
    """
    from clcli.importers import import_checkpoint

    result = import_checkpoint(file, layout, out, branch=branch, heads=heads, trust_pickle=trust_pickle)
    emit(result, as_json, "import")


def register(app: typer.Typer) -> None:
    """Add ``clcli import`` to ``app``."""
    app.command("import")(import_)
