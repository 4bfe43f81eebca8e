"""The ``clcli`` command-line tool: each command parses, calls one library function, prints.

Errors a user can cause end with one message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from clcli.cli_cache import cache_app
from clcli.cli_eval import embed, eval_app
from clcli.cli_io import register as register_io
from clcli.cli_options import (
    ActivationOpt,
    AllowCodeOpt,
    CkptOpt,
    JsonOpt,
    OutputOpt,
    RunOpt,
    TrustOpt,
    command_group,
)
from clcli.cli_print import print_pretrain
from clcli.cli_report import check_data_spec, command_console, emit, print_zeroshot, user_errors
from clcli.cli_report_cmd import report

app = typer.Typer(
    rich_markup_mode=None,  # plain help: see clcli.cli_options.command_group
    help=(
        "Contrastive and self-supervised representation learning.\n\n"
        "Train an encoder with a recipe (clcli pretrain --recipe simclr), measure it (clcli eval knn), "
        "export it (clcli export).  Start with `clcli recipes list`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipes_app = command_group("List the built-in recipes or show one fully resolved.")
app.add_typer(eval_app, name="eval")
app.add_typer(recipes_app, name="recipes")
app.add_typer(cache_app, name="cache")
app.command("report")(report)
register_io(app)


def _version(value: bool) -> None:
    if value:
        from clcli import __version__

        typer.echo(f"clcli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version of clcli and exit."),
    ] = None,
) -> None:
    pass


# -------------------------------------------------------------------------------- pretrain
@app.command()
@user_errors
def pretrain(
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            "-r",
            help="Built-in recipe name (see `clcli recipes list`) or a path to a YAML recipe. "
            "With --resume it may be left out: the run folder's recipe is used.",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Training data: a folder of images (class sub-folders = labels), a parquet/arrow file "
            "or folder, a save_to_disk folder, hf:NAME for a Hugging Face dataset, or embedded:digits "
            "(the default, shipped with scikit-learn). Same as --set data.source=...",
        ),
    ] = None,
    out_arg: Annotated[
        str | None,
        typer.Option(
            "--out", "-o", help="Run folder for checkpoints, metrics and the resolved recipe [default: runs/<recipe>]."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Override any recipe field by its dotted path, e.g. --set trainer.epochs=1 "
            "--set optim.lr=0.1 --set views.groups.0.size=64. Repeatable; values are read as YAML.",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue the run in --out from its latest checkpoint (exactly where it stopped)."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing run in --out instead of refusing.")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Do not draw the progress bar.")] = False,
    allow_code: AllowCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train an encoder with a recipe.

    Prints the resolved schedule, shows a progress bar (loss, learning rate, images/s, ETA), writes
    metrics.jsonl, recipe.yaml, provenance.json and checkpoints into the run folder. Ctrl-C saves a
    checkpoint and stops with exit code 130 (a second Ctrl-C stops at once); --resume continues it.
    """
    from clcli.dist import is_main
    from clcli.errors import ClcliError
    from clcli.recipe import apply_overrides, load_recipe, validate_recipe
    from clcli.runs import read_run_recipe
    from clcli.train import pretrain as run_pretrain
    from clcli.trust import allowing_code

    if out_arg is not None and not out_arg.strip():
        raise ClcliError("--out is empty: give the run folder, e.g. --out runs/NAME")
    out = Path(out_arg) if out_arg is not None else None
    overrides = list(set_ or [])
    if data is not None:
        check_data_spec(data)
        overrides.append(f"data.source={json.dumps(data)}")
    if recipe is None:
        if not (resume and out is not None):
            raise ClcliError(
                "give --recipe NAME|PATH (or --resume --out RUN to continue a run); see `clcli recipes list`"
            )
        base = read_run_recipe(out)
        resolved = validate_recipe(apply_overrides(base.to_dict(), overrides))
    else:
        resolved = load_recipe(recipe, overrides)
    run_dir = out or Path("runs") / resolved.name
    console = command_console(as_json)
    with allowing_code(allow_code):
        summary = run_pretrain(
            resolved,
            run_dir,
            resume=resume,
            overwrite=overwrite,
            console=console,
            show_progress=not (no_progress or as_json),
        )
    if not is_main():
        if summary.get("interrupted"):
            raise typer.Exit(130)
        return  # under torchrun the main process alone reports
    if summary.get("skipped_bad_images"):
        files, reads = summary["skipped_bad_images"], summary.get("skipped_bad_reads", 0)
        console.print(
            f"[yellow]skipped {files} unreadable image file{'s' if files != 1 else ''}"
            + (f" ({reads} reads over the epochs)" if reads != files else "")
            + "[/]"
        )
    print_pretrain(summary, as_json, run_dir)
    if summary.get("interrupted"):
        raise typer.Exit(130)  # interrupted: the checkpoint is saved, the run is not finished


# -------------------------------------------------------------------------------- zeroshot
@app.command()
@user_errors
def zeroshot(
    run: Annotated[
        Path | None, typer.Option("--run", help="A CLIP run folder written by `clcli pretrain --recipe clip`.")
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels", help="Class names separated by commas, e.g. cat,dog,ship (default: the data's class names)."
        ),
    ] = None,
    labels_file: Annotated[
        Path | None, typer.Option("--labels-file", help="A text file with one class name per line.")
    ] = None,
    templates: Annotated[
        str | None,
        typer.Option(
            "--templates",
            help="Prompt templates: a set (simple, cifar10, imagenet), a file with one template per line, or one "
            "template such as 'a photo of a {}.' (default: the run's method.zeroshot_templates; imagenet for a "
            "checkpoint file).",
        ),
    ] = None,
    images: Annotated[
        Path | None, typer.Option("--images", help="An image file or a folder of images (searched recursively).")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="A data spec as for pretrain --data; labelled data gives accuracy per class."),
    ] = None,
    split: Annotated[
        str | None, typer.Option("--split", help="Split of --data to classify (default: the recipe's test split).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Classify only the first N images of --data.")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="With --run: a checkpoint folder of the run. Without --run: a pretrained CLIP checkpoint in the "
            "OpenAI / open_clip layout (safetensors, or a torch state dict loaded with weights_only=True).",
        ),
    ] = None,
    vocab: Annotated[
        Path | None,
        typer.Option(
            "--vocab",
            help="CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) for --checkpoint (default: the copy in an "
            "installed open_clip package).",
        ),
    ] = None,
    trust_torchscript: TrustOpt = False,
    activation: ActivationOpt = "quick_gelu",
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Predictions shown per image.")] = 5,
    predictions: Annotated[
        bool, typer.Option("--predictions", help="Also list per-image predictions for labelled data.")
    ] = False,
    calibrate: Annotated[
        str,
        typer.Option(
            "--calibrate",
            help="none, or zscore: standardise each label's scores over all the images classified. Counters a "
            "model's bias towards the labels it was trained on when a large, mixed collection also holds images "
            "of labels it never saw (generalised zero-shot); leave it off for a few images or a single class.",
        ),
    ] = "none",
    output: OutputOpt = None,
    allow_code: AllowCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Zero-shot classification from label text with a CLIP run or a pretrained CLIP checkpoint.

    Each label is put into every prompt template; the normalised text embeddings are averaged and
    re-normalised into the classifier. Prints each image's top predictions with probabilities, or,
    when --data is labelled, top-1 / top-5 accuracy and a per-class table.
    """
    from clcli.evaluate.zeroshot import zeroshot as run_zeroshot
    from clcli.trust import allowing_code

    check_data_spec(data)
    with allowing_code(allow_code):
        result = run_zeroshot(
            run,
            checkpoint=checkpoint,
            vocab=vocab,
            trust_torchscript=trust_torchscript,
            activation=activation,
            labels=labels,
            labels_file=labels_file,
            templates=templates,
            images=images,
            data=data,
            split=split,
            limit=limit,
            top_k=top_k,
            predictions=predictions,
            calibrate=calibrate,
            output=output,
            console=command_console(as_json),
            show_progress=not as_json,
        )
    print_zeroshot(result, as_json)


# ---------------------------------------------------------------------------------- export
@app.command()
@user_errors
def export(
    run: RunOpt,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="The file to write, e.g. backbone.safetensors (a folder for --format hf)."),
    ],
    checkpoint: CkptOpt = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="safetensors, torchscript (a traced archive), onnx (dynamic batch axis; needs clcli[onnx]) or hf "
            "(a folder: config.json, model.safetensors and a model card).",
        ),
    ] = "safetensors",
    allow_code: AllowCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the run's encoder as safetensors with its recipe and input normalisation as metadata,
    or as TorchScript, ONNX or a Hugging Face model folder (--format).

    Load a safetensors file or an hf folder back with `clcli.load_backbone(path)`; a torchvision ResNet
    file also loads with load_state_dict(strict=True) into the torchvision model built the same way.
    """
    from clcli.export import export_run
    from clcli.trust import allowing_code

    with allowing_code(allow_code):
        result = export_run(run, out, checkpoint=checkpoint, fmt=fmt)
    emit(result, as_json, "export")


# --------------------------------------------------------------------------------- recipes
@recipes_app.command("list")
@user_errors
def recipes_list(as_json: JsonOpt = False) -> None:
    """The built-in recipes with their method and description."""
    from clcli.recipe import read_recipe_file, recipe_names

    rows = []
    for name in recipe_names():
        raw = read_recipe_file(name)
        rows.append(
            {
                "name": name,
                "method": (raw.get("method") or {}).get("name", "?"),
                "description": raw.get("description", ""),
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("recipe", "method", "description")
    for r in rows:
        table.add_row(r["name"], r["method"], r["description"])
    Console().print(table)


@recipes_app.command("show")
@user_errors
def recipes_show(
    name: Annotated[str, typer.Argument(help="Recipe name or YAML path.")],
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Overrides, as for pretrain.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The resolved recipe: every field with its default filled in (YAML, or JSON with --json)."""
    from clcli.recipe import load_recipe

    recipe = load_recipe(name, list(set_ or []))
    if as_json:
        typer.echo(json.dumps(recipe.to_dict(), indent=2))
    else:
        typer.echo(recipe.to_yaml())


app.command("embed")(embed)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    sys.exit(main())
