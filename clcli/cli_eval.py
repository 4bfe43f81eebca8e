"""``clcli eval knn|linear|retrieval`` and ``clcli embed``: each parses, calls one library function, prints once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clcli.cli_io import FromOpt, TrustPickleOpt
from clcli.cli_options import (
    ActivationOpt,
    AllowCodeOpt,
    DataOpt,
    EvalCkptOpt,
    EvalRunOpt,
    FeaturesOpt,
    JsonOpt,
    OutputOpt,
    TestLimitOpt,
    TestSplitOpt,
    TrainLimitOpt,
    TrainSplitOpt,
    TrustOpt,
    command_group,
)
from clcli.cli_print import print_embed, print_knn, print_linear, print_retrieval
from clcli.cli_report import check_data_spec, command_console, user_errors

eval_app = command_group(
    "Evaluate a trained run (or a pretrained CLIP file) on frozen features: weighted kNN, a linear probe, "
    "or retrieval (recall@K, mAP)."
)


@eval_app.command("knn")
@user_errors
def eval_knn(
    run: EvalRunOpt = None,
    checkpoint: EvalCkptOpt = None,
    trust_torchscript: TrustOpt = False,
    activation: ActivationOpt = "quick_gelu",
    import_from: FromOpt = None,
    trust_pickle: TrustPickleOpt = False,
    data: DataOpt = None,
    train_split: TrainSplitOpt = None,
    test_split: TestSplitOpt = None,
    k: Annotated[
        int | None, typer.Option("--k", min=1, help="Neighbours that vote [default: the recipe's eval.knn_k].")
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature",
            min=1e-6,
            help="Vote weight exp(similarity / T) [default: the recipe's eval.knn_temperature].",
        ),
    ] = None,
    features: FeaturesOpt = None,
    train_limit: TrainLimitOpt = None,
    test_limit: TestLimitOpt = None,
    output: OutputOpt = None,
    allow_code: AllowCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Weighted k-nearest-neighbour accuracy of a run's frozen features (top-1 and top-5).

    Features are L2-normalised; each test image's k most similar reference images vote with weight
    exp(s/T). The JSON result records k, T, the feature layer, the splits and the checkpoint.

    A pretrained CLIP file needs no run: `clcli eval knn --checkpoint ViT-B-32.safetensors --data DIR`
    evaluates its image tower (images resized as CLIP was trained: bicubic, OpenAI's mean and std).
    """
    from clcli.evaluate.protocols import knn_eval
    from clcli.trust import allowing_code

    check_data_spec(data)
    with allowing_code(allow_code):
        result = knn_eval(
            run,
            checkpoint=checkpoint,
            trust_torchscript=trust_torchscript,
            activation=activation,
            layout=import_from,
            trust_pickle=trust_pickle,
            data=data,
            train_split=train_split,
            test_split=test_split,
            k=k,
            temperature=temperature,
            features=features,
            train_limit=train_limit,
            test_limit=test_limit,
            output=output,
            console=command_console(as_json),
            show_progress=not as_json,
        )
    print_knn(result, as_json)


@eval_app.command("linear")
@user_errors
def eval_linear(
    run: EvalRunOpt = None,
    checkpoint: EvalCkptOpt = None,
    trust_torchscript: TrustOpt = False,
    activation: ActivationOpt = "quick_gelu",
    import_from: FromOpt = None,
    trust_pickle: TrustPickleOpt = False,
    data: DataOpt = None,
    train_split: TrainSplitOpt = None,
    test_split: TestSplitOpt = None,
    features: FeaturesOpt = None,
    train_limit: TrainLimitOpt = None,
    test_limit: TestLimitOpt = None,
    output: OutputOpt = None,
    allow_code: AllowCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Linear probe: logistic regression (L-BFGS) on frozen, pre-extracted features.

    The L2 strength is chosen from the recipe's eval.linear_l2 on a held-out part of the training
    split, then the classifier is refit on the whole split and scored on the test split.
    Like `eval knn`, it also takes a pretrained CLIP file: --checkpoint FILE --data SPEC.
    """
    from clcli.evaluate.protocols import linear_eval
    from clcli.trust import allowing_code

    check_data_spec(data)
    with allowing_code(allow_code):
        result = linear_eval(
            run,
            checkpoint=checkpoint,
            trust_torchscript=trust_torchscript,
            activation=activation,
            layout=import_from,
            trust_pickle=trust_pickle,
            data=data,
            train_split=train_split,
            test_split=test_split,
            features=features,
            train_limit=train_limit,
            test_limit=test_limit,
            output=output,
            console=command_console(as_json),
            show_progress=not as_json,
        )
    print_linear(result, as_json)


@eval_app.command("retrieval")
@user_errors
def eval_retrieval(
    run: EvalRunOpt = None,
    checkpoint: EvalCkptOpt = None,
    trust_torchscript: TrustOpt = False,
    activation: ActivationOpt = "quick_gelu",
    data: DataOpt = None,
    train_split: Annotated[
        str | None,
        typer.Option("--train-split", help="Split searched (the gallery) [default: the recipe's data.train_split]."),
    ] = None,
    test_split: Annotated[
        str | None,
        typer.Option(
            "--test-split", help="Split whose images are the queries [default: the recipe's data.test_split]."
        ),
    ] = None,
    features: Annotated[
        str | None,
        typer.Option(
            "--features",
            help="backbone (pooled encoder output) or embedding (the method's projected embedding) "
            "[default: the recipe's eval.features].",
        ),
    ] = None,
    train_limit: Annotated[
        int | None, typer.Option("--train-limit", help="Use only the first N gallery images (N >= 1).")
    ] = None,
    test_limit: Annotated[
        int | None, typer.Option("--test-limit", help="Use only the first N query images (N >= 1).")
    ] = None,
    output: OutputOpt = None,
    allow_code: AllowCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Image retrieval: recall@1/5/10 and mAP, the test split querying the train split.

    Images are ranked by cosine similarity of their features; a gallery image is relevant when it
    has the query's label. Recall@K: the fraction of queries with a relevant image among their K
    nearest; mAP: the mean average precision of the whole ranking. Like `eval knn`, it also takes a
    pretrained CLIP file: --checkpoint FILE --data SPEC.
    """
    from clcli.evaluate.retrieval import retrieval_eval
    from clcli.trust import allowing_code

    check_data_spec(data)
    with allowing_code(allow_code):
        result = retrieval_eval(
            run,
            checkpoint=checkpoint,
            trust_torchscript=trust_torchscript,
            activation=activation,
            data=data,
            train_split=train_split,
            test_split=test_split,
            features=features,
            train_limit=train_limit,
            test_limit=test_limit,
            output=output,
            console=command_console(as_json),
            show_progress=not as_json,
        )
    print_retrieval(result, as_json)


@user_errors
def embed(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="The file to write: F.parquet (one row per image), or F.npy with F.json beside it (--format npy).",
        ),
    ],
    run: EvalRunOpt = None,
    checkpoint: EvalCkptOpt = None,
    trust_torchscript: TrustOpt = False,
    activation: ActivationOpt = "quick_gelu",
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Images to embed, labelled or not (same forms as pretrain --data) [default: the run's training data].",
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            help="Split of --data to embed (a folder without split folders is the train split) "
            "[default: the recipe's data.train_split].",
        ),
    ] = None,
    features: Annotated[
        str | None,
        typer.Option(
            "--features",
            help="backbone (pooled encoder output, what kNN scores by default) or embedding (the method's projected "
            "embedding) [default: the recipe's eval.features].",
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            help="Embed only the first N images (N >= 1) [default: all; data.limit for the run's own training split].",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="Images per forward pass [default: the recipe's eval.batch_size]."),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="parquet or npy [default: npy for an --out ending in .npy, else parquet]."),
    ] = None,
    allow_code: AllowCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the features of every image of a split to a file: id (file path or table row), label, vector.

    The vectors are those the evaluations score (same transform, precision and layer), so a saved
    row equals what `clcli eval knn` computes for that image. Parquet holds one row per image:
    index, id, label and class when the split is labelled, and the feature vector; --format npy
    writes the [N, D] float32 matrix and a JSON file with the ids and labels beside it.
    A pretrained CLIP file works too: --checkpoint FILE --data SPEC.
    """
    from clcli.evaluate.embed import embed as run_embed
    from clcli.trust import allowing_code

    check_data_spec(data)
    with allowing_code(allow_code):
        result = run_embed(
            run,
            out,
            checkpoint=checkpoint,
            trust_torchscript=trust_torchscript,
            activation=activation,
            data=data,
            split=split,
            features=features,
            limit=limit,
            batch_size=batch_size,
            fmt=fmt,
            console=command_console(as_json),
            show_progress=not as_json,
        )
    print_embed(result, as_json)
