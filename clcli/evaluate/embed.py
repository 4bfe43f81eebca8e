"""Features of every image of a split, saved to a file: what ``clcli embed`` runs.

The vectors come from the extraction path that kNN and the linear probe use
(:func:`clcli.evaluate.features.extract_features`: the evaluation transform, the recipe's
precision, the backbone's pooled output or the method's embedding), so a saved row equals the
feature the evaluations score.  The model is a run or an imported CLIP file
(:func:`clcli.evaluate.loader.load_model`).

Two file formats:

- ``parquet`` (one row per image): ``index`` (the image's position in the split), ``id`` (its
  file path, or ``"<file> row N"`` for a table), ``label`` and ``class`` when the split is
  labelled, and ``features`` (a fixed-size list of float32).  The schema's metadata key
  ``clcli`` holds what was embedded (JSON: run, checkpoint, features, data, split, dimension).
- ``npy``: the ``[N, D]`` float32 matrix in ``F.npy`` and, beside it, ``F.json`` with the same
  description and the per-row ``index``, ``id`` and ``label`` lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from clcli.errors import ClcliError
from clcli.evaluate.features import FeatureSet, extract_features
from clcli.evaluate.loader import check_layer, load_model, open_split
from clcli.evaluate.results import timestamp
from clcli.fsio import atomic_output, check_output_file

__all__ = ["EMBED_FORMATS", "embed", "embed_format", "read_embeddings", "sidecar_path"]

EMBED_FORMATS = ("parquet", "npy")


def embed_format(out: Path, fmt: str | None) -> str:
    """The file format: ``fmt`` when given, else from ``out``'s suffix (``.npy``: npy, anything else: parquet).

    A ``.npy`` or ``.parquet`` suffix that contradicts ``fmt`` is refused.
    """
    suffix = Path(out).suffix.lower().lstrip(".")
    if fmt is None:
        return "npy" if suffix == "npy" else "parquet"
    if fmt not in EMBED_FORMATS:
        raise ClcliError(f"--format must be 'parquet' or 'npy', got {fmt!r}")
    if suffix in EMBED_FORMATS and suffix != fmt:
        raise ClcliError(f"--out {out} names a .{suffix} file but --format is {fmt}: give --out F.{fmt}")
    return fmt


def sidecar_path(out: Path) -> Path:
    """The JSON file written beside an ``npy`` matrix: ``F.npy`` -> ``F.json``."""
    out = Path(out)
    return out.with_suffix(".json") if out.suffix.lower() == ".npy" else out.with_name(out.name + ".json")


def embed(
    run_dir: Path | None,
    out: Path,
    *,
    checkpoint: Path | None = None,
    trust_torchscript: bool = False,
    activation: str = "quick_gelu",
    data: str | None = None,
    split: str | None = None,
    features: str | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    fmt: str | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Embed every image of one split of ``data`` (default: the run's data, its train split) into ``out``.

    ``run_dir`` is a run folder; or ``None`` with ``checkpoint`` a pretrained CLIP file and ``data``
    the images.  ``features``: ``backbone`` or ``embedding`` (default: the recipe's ``eval.features``;
    a memory bank is refused: it holds the training images' rows, not a model of new images).
    ``limit``: the first N images only (default: all; for the run's own training split ``data.limit``,
    the reference set kNN votes with); ``batch_size``: images per forward pass (default: the
    recipe's ``eval.batch_size``).  The output paths are checked before the model loads; each file
    is replaced only once complete.  Returns a summary (what was embedded, where, how many rows).
    """
    fmt = embed_format(out, fmt)
    if features is not None:
        _check_features(features)
    for flag, value in (("--limit", limit), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ClcliError(f"{flag} must be at least 1, got {value}")
    out = Path(out)
    targets = [out] + ([sidecar_path(out)] if fmt == "npy" else [])
    for target in targets:
        check_output_file(target, "the embeddings file", example=f"embeddings.{fmt}")
    src = load_model(
        run_dir, checkpoint, data=data, needs_data=True, trust_torchscript=trust_torchscript, activation=activation
    )
    recipe = src.recipe
    layer = _check_features(features or recipe.eval.features)
    spec = data or recipe.data.source
    split = split or recipe.data.train_split
    if limit is None and data is None and run_dir is not None and split == recipe.data.train_split:
        limit = recipe.data.limit  # the images the run trained on, as kNN's reference set
    source = open_split(recipe, spec, split, limit, labelled=False)
    fs = extract_features(
        src.model,
        source,
        recipe,
        device=src.device,
        layer=layer,
        batch_size=batch_size,
        show_progress=show_progress,
        console=console,
        description=f"embedding {split}",
        interpolation=src.interpolation,
    )
    assert fs.index is not None
    index = fs.index.tolist()
    ids = [source.describe(i) for i in index]
    classes = source.classes
    meta = {
        "features": layer,
        "feature_dim": int(fs.features.shape[1]),
        "data": spec,
        "split": split,
        **src.describe(),
        "embedded": timestamp(),
    }
    if fmt == "parquet":
        _write_parquet(out, fs, index, ids, classes, meta)
    else:
        _write_npy(out, fs, index, ids, classes, meta)
    return {
        **meta,
        "format": fmt,
        "images": len(index),
        "labelled": fs.labels is not None,
        "skipped_images": fs.skipped,
        "output": str(out),
        **({"sidecar": str(sidecar_path(out))} if fmt == "npy" else {}),
    }


def _check_features(layer: str) -> str:
    if check_layer(layer) == "bank":
        raise ClcliError(
            "--features bank is the memory bank of the run's training images, not features of new images; "
            "embed with backbone or embedding"
        )
    return layer


def _write_parquet(
    out: Path, fs: FeatureSet, index: list[int], ids: list[str], classes: list[str] | None, meta: dict[str, Any]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = fs.features.numpy().astype(np.float32, copy=False)
    n, dim = vectors.shape
    columns: dict[str, pa.Array] = {
        "index": pa.array(index, type=pa.int64()),
        "id": pa.array(ids, type=pa.string()),
    }
    if fs.labels is not None:
        labels = fs.labels.tolist()
        columns["label"] = pa.array(labels, type=pa.int64())
        if classes:
            columns["class"] = pa.array(
                [classes[y] if 0 <= y < len(classes) else None for y in labels], type=pa.string()
            )
    columns["features"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(n * dim)), dim)
    table = pa.table(columns).replace_schema_metadata({"clcli": json.dumps(meta)})
    with atomic_output(out, "the embeddings file", "embeddings.parquet") as tmp:
        pq.write_table(table, tmp)


def _write_npy(
    out: Path, fs: FeatureSet, index: list[int], ids: list[str], classes: list[str] | None, meta: dict[str, Any]
) -> None:
    side: dict[str, Any] = {**meta, "rows": len(index), "index": index, "id": ids}
    if fs.labels is not None:
        side["label"] = fs.labels.tolist()
        side["classes"] = classes
    with atomic_output(out, "the embeddings file", "embeddings.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, fs.features.numpy().astype(np.float32, copy=False))
    with atomic_output(sidecar_path(out), "the embeddings' sidecar", "embeddings.json") as tmp:
        tmp.write_text(json.dumps(side) + "\n")


def read_embeddings(path: Path) -> dict[str, Any]:
    """A file written by :func:`embed`, back as ``{"features": float32 [N, D] array, "index", "id",
    "label" (None when unlabelled), "meta"}`` (parquet, or npy with its sidecar)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        side = json.loads(sidecar_path(path).read_text())
        return {
            "features": np.load(path),
            "index": side["index"],
            "id": side["id"],
            "label": side.get("label"),
            "meta": {k: v for k, v in side.items() if k not in ("index", "id", "label")},
        }
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    dim = table.schema.field("features").type.list_size
    flat = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return {
        "features": flat.reshape(-1, dim).astype(np.float32, copy=False),
        "index": table.column("index").to_pylist(),
        "id": table.column("id").to_pylist(),
        "label": table.column("label").to_pylist() if "label" in table.column_names else None,
        "meta": json.loads((table.schema.metadata or {}).get(b"clcli", b"{}")),
    }
