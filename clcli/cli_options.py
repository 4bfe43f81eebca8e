"""Command-line options shared by several ``clcli`` commands (typer annotations, with their help text)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables and progress bars.")]

RunOpt = Annotated[Path, typer.Option("--run", help="The run folder written by `clcli pretrain`.")]
EvalRunOpt = Annotated[
    Path | None,
    typer.Option("--run", help="The run folder written by `clcli pretrain` (or give --checkpoint FILE instead)."),
]
CkptOpt = Annotated[
    Path | None, typer.Option("--checkpoint", help="A checkpoint folder of the run [default: its latest].")
]
EvalCkptOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help="With --run: a checkpoint folder of the run [default: its latest]. Without --run: a file written by "
        "clcli export or clcli import, a published checkpoint with --from LAYOUT, or a pretrained CLIP checkpoint "
        "file in the OpenAI / open_clip layout (its image tower), evaluated on --data.",
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-torchscript",
        help="Allow a TorchScript archive as --checkpoint (OpenAI's .pt files). Loading one runs code stored in "
        "the file: use only files from a source you trust.",
    ),
]
AllowCodeOpt = Annotated[
    bool,
    typer.Option(
        "--allow-code",
        help="Allow the recipe to load Python code it names (a python:MODULE hook, e.g. method.text_encoder): "
        "importing a module runs its code, so use it only for recipes and run folders you trust. "
        "Same as the environment variable CLCLI_ALLOW_CODE=1.",
    ),
]
ActivationOpt = Annotated[
    str,
    typer.Option(
        "--activation",
        help="MLP activation of a --checkpoint CLIP file: quick_gelu (OpenAI's models, open_clip's *-quickgelu) "
        "or gelu (open_clip's other models).",
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Labelled data to evaluate on (same forms as pretrain --data) [default: the run's training data].",
    ),
]
TrainSplitOpt = Annotated[
    str | None,
    typer.Option(
        "--train-split", help="Split whose features are the reference set [default: the recipe's data.train_split]."
    ),
]
TestSplitOpt = Annotated[
    str | None, typer.Option("--test-split", help="Split that is classified [default: the recipe's data.test_split].")
]
FeaturesOpt = Annotated[
    str | None,
    typer.Option(
        "--features",
        help="backbone (pooled encoder output), embedding (the method's projected embedding) or, for kNN "
        "with a memory-bank method (instdisc), bank: the bank of the run's training images is the reference "
        "set and test images are embedded [default: the recipe's eval.features].",
    ),
]
TrainLimitOpt = Annotated[
    int | None, typer.Option("--train-limit", help="Use only the first N reference images (N >= 1).")
]
TestLimitOpt = Annotated[int | None, typer.Option("--test-limit", help="Use only the first N test images (N >= 1).")]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output", help="Where to write the JSON result [default: RUN/eval/<protocol>.json; none for a file]."
    ),
]


def command_group(help: str) -> typer.Typer:
    """A group of ``clcli`` commands (``clcli eval ...``, ``clcli cache ...``) with the tool's help style.

    Help is plain text (``rich_markup_mode=None``): rich markup would read ``[default: ...]`` in an
    option's help as a style tag and drop it, and shows boolean flags as taking a ``<bool>`` value.
    """
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None)
