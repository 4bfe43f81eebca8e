"""Registries of pluggable stages: methods, backbones, data sources and view pipelines.

Built-ins are registered by import path (``"module:attribute"``) and imported only when first
asked for, so this module imports nothing above it.  A separate package adds its own entries
through Python entry points in the groups ``clcli.methods``, ``clcli.backbones``,
``clcli.sources`` and ``clcli.views``; a recipe then names them like built-ins::

    [project.entry-points."clcli.methods"]
    mymethod = "my_package.method:MyMethod"
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from clcli.errors import RecipeError


class Registry:
    """Name -> object, with lazy import of built-ins and discovery of entry points."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, Any] = {}
        self._plugins_loaded = False

    def register(self, name: str, obj: Any = None) -> Any:
        """Register ``obj`` (an object or a ``"module:attr"`` string) as ``name``; usable as a decorator."""
        if obj is None:

            def decorator(target: Any) -> Any:
                self._entries[name] = target
                return target

            return decorator
        self._entries[name] = obj
        return obj

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            self._entries.setdefault(ep.name, ep)

    @staticmethod
    def _available(entry: Any) -> bool:
        """A built-in given by import path is listed only when its module is present."""
        if not isinstance(entry, str):
            return True
        from importlib.util import find_spec

        try:
            return find_spec(entry.partition(":")[0]) is not None
        except ModuleNotFoundError:
            return False

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(n for n, e in self._entries.items() if self._available(e))

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._entries and self._available(self._entries[name])

    def get(self, name: str) -> Any:
        self._load_plugins()
        if name not in self._entries or not self._available(self._entries[name]):
            raise RecipeError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        elif hasattr(entry, "load") and hasattr(entry, "group"):  # an importlib.metadata.EntryPoint
            try:
                entry = entry.load()
            except Exception as exc:  # a broken plug-in is the user's environment, not our bug
                raise RecipeError(f"the {self.kind} plug-in {name!r} failed to load: {exc}") from exc
            self._entries[name] = entry
        return entry


METHODS = Registry("method", "clcli.methods")
BACKBONES = Registry("backbone", "clcli.backbones")
SOURCES = Registry("data source", "clcli.sources")
VIEWS = Registry("view pipeline", "clcli.views")

# Built-in methods: one module per method under clcli/methods.
for _name, _target in {
    "simclr": "simclr:SimCLR",
    "instdisc": "instdisc:InstDisc",
    "invaspread": "invaspread:InvaSpread",
    "moco": "moco:MoCo",
    "mocov3": "mocov3:MoCoV3",
    "cpc": "cpc:CPC",
    "cmc": "cmc:CMC",
    "deepcluster": "deepcluster:DeepCluster",
    "swav": "swav:SwAV",
    "byol": "byol:BYOL",
    "simsiam": "simsiam:SimSiam",
    "dino": "dino:DINO",
    "clip": "clip:CLIP",
}.items():
    METHODS.register(_name, f"clcli.methods.{_target}")

for _depth in (18, 34, 50):
    BACKBONES.register(f"resnet{_depth}", "clcli.models.backbones:build_backbone")
BACKBONES.register("vit", "clcli.models.backbones:build_backbone")
BACKBONES.register("convnet", "clcli.models.backbones:build_backbone")

VIEWS.register("simclr", "clcli.views.pipelines:augment_pipeline")
VIEWS.register("center", "clcli.views.pipelines:center_pipeline")
VIEWS.register("cpc", "clcli.views.patches:cpc_pipeline")

# Data sources are chosen by the scheme before the first colon of the spec (``hf:NAME``);
# a spec with no registered scheme, or one that names an existing path, is a local path.  Factories
# are called as factory(spec, split, image_column=..., label_column=..., text_column=..., streaming=...).
SOURCES.register("embedded", "clcli.data.embedded:open_embedded")
SOURCES.register("hf", "clcli.data.hub:open_hub")
