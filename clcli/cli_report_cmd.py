"""``clcli report``: the command that writes a run's HTML report (:func:`clcli.report.make_report`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from clcli.cli_options import JsonOpt, RunOpt
from clcli.cli_report import check_data_spec, command_console, user_errors


@user_errors
def report(
    run: RunOpt,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for index.html and its PNGs [default: RUN/report].")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Labelled data for the embedding map and the neighbours (same forms as pretrain --data) "
            "[default: the run's data].",
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option("--split", help="Split to draw the sample from [default: the test split, else the train split]."),
    ] = None,
    sample: Annotated[
        int, typer.Option("--sample", help="Images drawn at random for the map and the neighbours; 0: none.")
    ] = 500,
    queries: Annotated[int, typer.Option("--queries", help="Query images in the neighbour grid.")] = 8,
    neighbours: Annotated[int, typer.Option("--neighbours", help="Nearest neighbours shown per query.")] = 6,
    map_method: Annotated[
        str, typer.Option("--map", help="2-D map: auto (UMAP when umap-learn is installed, else t-SNE), tsne, umap.")
    ] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample and the map.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Write RUN/report/index.html: curves, evaluation results, an embedding map, neighbours (and ViT attention).

    One self-contained page with its PNGs beside it (needs matplotlib: pip install 'clcli[report]').
    Open it in a browser: it loads nothing from the network.
    """
    from clcli.report import make_report

    check_data_spec(data)
    result = make_report(
        run,
        out=out,
        data=data,
        split=split,
        sample=sample,
        queries=queries,
        neighbours=neighbours,
        map_method=map_method,
        seed=seed,
        console=command_console(as_json),
    )
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    Console().print(f"report written to [bold]{result['report']}[/] ({len(result['figures'])} figures)")
