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
from clcli.cli_print import print_embed, print_knn, print_linear, print_retrieval, print_trained
from clcli.cli_report import check_data_spec, command_console, user_errors

eval_app = command_group(
    "Evaluate a trained run (or a pretrained CLIP file): weighted kNN, a linear probe (L-BFGS or the papers' SGD "
    "protocol) and retrieval (recall@K, mAP) on frozen features, or fine-tuning with a fraction of the labels."
)

EpochsOpt = Annotated[
    int | None, typer.Option("--epochs", help="SGD protocols: passes over the training images [default: the recipe's].")
]
LrOpt = Annotated[
    float | None,
    typer.Option(
        "--lr", help="SGD protocols: learning rate at batch 256, scaled by batch/256 [default: the recipe's]."
    ),
]
BatchOpt = Annotated[
    int | None, typer.Option("--batch-size", help="SGD protocols: images per step [default: the recipe's].")
]
WeightDecayOpt = Annotated[
    float | None, typer.Option("--weight-decay", help="SGD protocols: weight decay [default: the recipe's].")
]


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
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol",
            help="lbfgs: logistic regression on pre-extracted features (fast); sgd: the papers' protocol, a linear "
            "layer trained with SGD on augmented images (settings: the recipe's eval.linear_sgd).",
        ),
    ] = "lbfgs",
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    weight_decay: WeightDecayOpt = None,
    output: OutputOpt = None,
    allow_code: AllowCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Linear evaluation on frozen features: the L-BFGS probe (default) or the papers' SGD protocol.

    --protocol lbfgs: logistic regression on pre-extracted features; the L2 strength is chosen from
    the recipe's eval.linear_l2 on a held-out part of the training split, then the classifier is
    refit on the whole split and scored on the test split (RUN/eval/linear.json).
    --protocol sgd: a linear layer trained with momentum SGD and a cosine schedule on features of
    training images randomly cropped and flipped every epoch, 100 epochs by default (the recipe's
    eval.linear_sgd; --epochs, --lr, --batch-size, --weight-decay override it), the encoder frozen
    (RUN/eval/linear-sgd.json).
    Like `eval knn`, it also takes a pretrained CLIP file: --checkpoint FILE --data SPEC.
    """
    from clcli.errors import ClcliError
    from clcli.trust import allowing_code

    check_data_spec(data)
    if protocol not in ("lbfgs", "sgd"):
        raise ClcliError(f"--protocol must be 'lbfgs' or 'sgd', got {protocol!r}")
    if protocol == "sgd":
        from clcli.evaluate.linear_sgd import linear_sgd_eval

        with allowing_code(allow_code):
            result = linear_sgd_eval(
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
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                weight_decay=weight_decay,
                output=output,
                console=command_console(as_json),
                show_progress=not as_json,
            )
        print_trained(result, as_json)
        return
    given = [
        f
        for f, v in (("--epochs", epochs), ("--lr", lr), ("--batch-size", batch_size), ("--weight-decay", weight_decay))
        if v is not None
    ]
    if given:
        raise ClcliError(f"{', '.join(given)} set the SGD protocol: add --protocol sgd (the L-BFGS probe has none)")
    from clcli.evaluate.protocols import linear_eval

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


@eval_app.command("finetune")
@user_errors
def eval_finetune(
    run: EvalRunOpt = None,
    checkpoint: EvalCkptOpt = None,
    trust_torchscript: TrustOpt = False,
    activation: ActivationOpt = "quick_gelu",
    import_from: FromOpt = None,
    trust_pickle: TrustPickleOpt = False,
    data: DataOpt = None,
    train_split: TrainSplitOpt = None,
    test_split: TestSplitOpt = None,
    labels: Annotated[
        float | None,
        typer.Option(
            "--labels",
            help="Fine-tune on this fraction of the training labels (e.g. 0.01 or 0.1), a class-balanced subset "
            "drawn once with the recipe seed and saved [default: all labels].",
        ),
    ] = None,
    labels_file: Annotated[
        Path | None,
        typer.Option(
            "--labels-file",
            help="The label subset's file: read when it exists, written otherwise "
            "[default: RUN/eval/labels-<pct>pct.json; beside --output for a file].",
        ),
    ] = None,
    train_limit: TrainLimitOpt = None,
    test_limit: TestLimitOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    weight_decay: WeightDecayOpt = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Where to write the JSON result [default: RUN/eval/finetune.json, or finetune-<pct>pct.json with "
            "--labels; none for a file].",
        ),
    ] = None,
    allow_code: AllowCodeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tuning: the whole encoder with a new linear layer, trained on (a fraction of) the labels.

    SimCLR's semi-supervised protocol: Nesterov SGD with a cosine schedule on training images randomly
    cropped and flipped, no weight decay, 60 epochs with 1 % of the labels and 30 otherwise (the
    recipe's eval.finetune; --epochs, --lr, --batch-size, --weight-decay override it), then top-1 and
    top-5 on the test split. The run's checkpoint is not changed. Like `eval knn`, it also takes a
    file: --checkpoint FILE --data SPEC.
    """
    from clcli.evaluate.finetune import finetune_eval
    from clcli.trust import allowing_code

    check_data_spec(data)
    with allowing_code(allow_code):
        result = finetune_eval(
            run,
            checkpoint=checkpoint,
            trust_torchscript=trust_torchscript,
            activation=activation,
            layout=import_from,
            trust_pickle=trust_pickle,
            data=data,
            train_split=train_split,
            test_split=test_split,
            labels=labels,
            labels_file=labels_file,
            train_limit=train_limit,
            test_limit=test_limit,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            weight_decay=weight_decay,
            output=output,
            console=command_console(as_json),
            show_progress=not as_json,
        )
    print_trained(result, as_json)


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
