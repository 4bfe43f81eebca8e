"""What evaluation reads: one loader for a model and its preprocessing, and the labelled splits it is scored on.

A model comes from a run folder (the run's method with its latest or a chosen checkpoint) or from
a pretrained CLIP checkpoint file in the OpenAI / open_clip layout (Radford et al. 2021,
arXiv:2103.00020; see :mod:`clcli.models.clip_import`).  Either way it is placed by the training
device rule (:func:`clcli.engine.device.pick_device`) and comes with a recipe that says how its
images are prepared (``views``: size, resize, mean, std), which data it evaluates by default
(``data``), in which precision (``trainer.precision``) and with which evaluation defaults
(``eval``).  For a file that recipe is built from the file's own preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from clcli.data import ImageSource
from clcli.data.sources import limit_source, open_data
from clcli.engine.device import pick_device
from clcli.errors import CheckpointError, ClcliError, DataError
from clcli.recipe import DataConfig, EvalConfig, Recipe, TrainerConfig, ViewsConfig
from clcli.runs import load_run

# The layers evaluation reads: the pooled backbone, the method's embedding, or a memory bank (kNN only).
FEATURE_LAYERS: tuple[str, ...] = get_args(EvalConfig.model_fields["features"].annotation)
ACTIVATIONS = ("quick_gelu", "gelu")


def check_layer(layer: str) -> str:
    """``layer`` if it is one of :data:`FEATURE_LAYERS`, else a :class:`ClcliError` naming them."""
    if layer not in FEATURE_LAYERS:
        names = ", ".join(repr(n) for n in FEATURE_LAYERS[:-1]) + f" or {FEATURE_LAYERS[-1]!r}"
        raise ClcliError(f"--features must be {names}, got {layer!r}")
    return layer


@dataclass
class Loaded:
    """A model ready for evaluation, with its preprocessing and a description for results.

    ``model``: a :class:`~clcli.methods.base.Method` (a run) or an imported CLIP model, in eval
    mode on ``device``; ``recipe``: the run's recipe, or one describing the imported file;
    ``interpolation``: how images are resized (bilinear for runs, bicubic for CLIP files);
    ``zeroshot_templates``: the prompt templates the model names for zero-shot (None: none).
    """

    model: nn.Module
    recipe: Recipe
    device: torch.device
    checkpoint: Path
    run_dir: Path | None = None
    interpolation: str = "bilinear"
    method_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    zeroshot_templates: str | None = None

    def describe(self) -> dict[str, Any]:
        """What was evaluated: the checkpoint, the run (None for a file), the method and file options."""
        return {
            "checkpoint": str(self.checkpoint),
            "run": None if self.run_dir is None else str(self.run_dir),
            "method": self.method_name,
            **self.extra,
        }

    def default_output(self, protocol: str, output: Path | None) -> Path | None:
        """``output``, or ``RUN/eval/<protocol>.json`` for a run; None (nothing written) for a file."""
        if output is not None:
            return Path(output)
        return self.run_dir / "eval" / f"{protocol}.json" if self.run_dir is not None else None


def load_for_result(
    protocol: str, run_dir: Path | None, checkpoint: Path | None, output: Path | None, **options: Any
) -> tuple[Loaded, Path | None]:
    """:func:`load_model` for an evaluation that writes ``RUN/eval/<protocol>.json`` (or ``output``): an
    explicit ``output`` is checked before the model loads, the default one just after; ``options`` go to
    :func:`load_model`. Returns the loaded model and the result path (None for a file without ``output``)."""
    from clcli.evaluate.results import check_output

    check_output(output)
    loaded = load_model(run_dir, checkpoint, **options)
    out = loaded.default_output(protocol, output)
    check_output(out)
    return loaded, out


def load_model(
    run_dir: Path | None,
    checkpoint: Path | None = None,
    *,
    data: str | None = None,
    needs_data: bool = False,
    text: bool = False,
    vocab: Path | None = None,
    trust_torchscript: bool = False,
    activation: str = "quick_gelu",
    layout: str | None = None,
    trust_pickle: bool = False,
) -> Loaded:
    """Load a run (``run_dir``, optionally one of its ``checkpoint`` folders) or a CLIP file (``checkpoint``).

    ``needs_data``: a file has no data of its own, so ``data`` must be given; ``text``: the model
    must have a text tower (zero-shot), and a file its BPE vocabulary (``vocab``, or the copy in an
    installed open_clip).  ``activation`` is the MLP activation of a file's towers.  A file written by
    ``clcli export`` / ``clcli import``, or a published checkpoint in ``layout`` (``--from``), is
    evaluated as an encoder (:mod:`clcli.evaluate.encoder_file`).
    """
    if run_dir is not None:
        if layout is not None:
            raise ClcliError("--from names the layout of a --checkpoint FILE given without --run")
        recipe, method, path = load_run(Path(run_dir), checkpoint)
        if text and not method.has_text_tower:
            raise ClcliError(
                f"{run_dir} was trained with {recipe.method.name}, which has no text tower; zero-shot "
                "classification needs a CLIP run (or --checkpoint FILE --vocab FILE for a pretrained CLIP)"
            )
        device = next(method.parameters()).device
        return Loaded(
            method,
            recipe,
            device,
            path,
            Path(run_dir),
            "bilinear",
            recipe.method.name,
            zeroshot_templates=method.zeroshot_templates(),
        )
    if checkpoint is None:
        raise ClcliError(
            "give --run RUN (a run folder of clcli pretrain) or --checkpoint FILE (an exported or imported encoder, "
            "a pretrained CLIP checkpoint in the OpenAI / open_clip layout, or a published checkpoint with --from "
            "LAYOUT)" + (" with --data SPEC" if needs_data else "")
        )
    from clcli.evaluate.encoder_file import is_encoder_file, load_encoder_file

    if layout is not None or is_encoder_file(Path(checkpoint)):
        if text:
            raise ClcliError(f"{checkpoint} is an image encoder without a text tower; zero-shot needs a CLIP model")
        model, recipe, device, name, extra = load_encoder_file(
            Path(checkpoint), layout, data=data, needs_data=needs_data, trust_pickle=trust_pickle
        )
        return Loaded(model, recipe, device, Path(checkpoint), None, "bilinear", name, extra)
    if Path(checkpoint).is_dir():
        raise ClcliError(f"{checkpoint} is a folder: a run's checkpoint folder goes with --run RUN")
    if needs_data and data is None:
        raise ClcliError("an imported CLIP checkpoint has no training data of its own: give --data SPEC")
    if activation not in ACTIVATIONS:
        raise ClcliError(f"--activation must be 'quick_gelu' or 'gelu', got {activation!r}")
    from clcli.models.clip_import import load_clip

    model = load_clip(checkpoint, vocab=vocab, trust_torchscript=trust_torchscript, activation=activation)  # type: ignore[arg-type]
    extra: dict[str, Any] = {"activation": activation}
    if text:
        if model.tokenizer is None:
            raise CheckpointError(
                "an imported CLIP needs its BPE vocabulary: give --vocab bpe_simple_vocab_16e6.txt.gz "
                "(it ships with the open_clip package)"
            )
        extra["vocab"] = str(model.tokenizer.path)
    device = pick_device(TrainerConfig().device)
    model = model.to(device).eval()
    pre = model.preprocess
    recipe = Recipe(
        data=DataConfig(source=data) if data is not None else DataConfig(),
        views=ViewsConfig(eval_size=pre["size"], eval_resize=pre["resize"], mean=pre["mean"], std=pre["std"]),
        trainer=TrainerConfig(precision="bf16" if device.type == "cuda" else "fp32"),
    )
    return Loaded(model, recipe, device, Path(checkpoint), None, pre["interpolation"], "clip (imported)", extra)


def open_split(recipe: Recipe, spec: str, split: str, limit: int | None, *, labelled: bool = True) -> ImageSource:
    """One split of ``spec`` as an indexed source (first ``limit`` images); refuses streams and empty splits.

    With ``labelled`` (kNN, linear probe) a split without labels is refused too.
    """
    source = open_data(spec, split, recipe.data, streaming=False)
    if not isinstance(source, ImageSource):
        raise DataError(f"{spec} split {split!r} cannot be evaluated as a stream")
    source = limit_source(source, limit)
    if len(source) == 0:
        raise DataError(f"split {split!r} of {spec} has no images")
    if labelled and source.labels() is None:
        raise DataError(f"split {split!r} of {spec} has no labels; evaluation needs labelled images")
    return source
