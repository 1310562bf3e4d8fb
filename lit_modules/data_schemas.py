"""Typed Hydra schemas of the DataModules (`conf/data/*.yaml`), derived from their constructors.

Each schema is made from the DataModule's `__init__` signature (names, annotations, defaults), so the
two cannot drift: a new DataModule argument is a config key the day it is added, and a misspelt
key (`data.num_frame=3`) or a wrong type fails at compose time with the full key named.
`register_data_schemas` is called from `lit_modules.schemas.register_schemas`.
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import field, make_dataclass
from typing import Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

__all__ = ["DATA_SCHEMAS", "register_data_schemas", "schema_from_signature"]

# ConfigStore name -> the DataModule whose constructor it mirrors
DATA_SCHEMAS = {
    "text_schema": "datamodules.text.TextDataModule",
    "image_schema": "datamodules.media.ImageDataModule",
    "video_schema": "datamodules.media.VideoDataModule",
    "audio_schema": "datamodules.media.AudioDataModule",
    "tokens_schema": "datamodules.tokens.TokenDataModule",
    "knowledge_schema": "datamodules.knowledge.KnowledgeDataModule",
    "knowledge_finetune_schema": "datamodules.knowledge.KnowledgeFinetuneDataModule",
    "tasks_schema": "datamodules.tasks.TaskDataModule",
    "multimodal_schema": "datamodules.multimodal.MultimodalDataModule",
}


def _omegaconf_type(hint):
    """`X | None` (PEP 604) -> Optional[X]: OmegaConf 2.3 understands typing.Union, not types.UnionType."""
    if isinstance(hint, types.UnionType):
        args = typing.get_args(hint)
        return Union[tuple(_omegaconf_type(a) for a in args)]
    origin = typing.get_origin(hint)
    if origin is Union:
        return Optional[_omegaconf_type(next(a for a in typing.get_args(hint) if a is not type(None)))] \
            if type(None) in typing.get_args(hint) else hint
    return hint


def _init_params(cls: type):
    """(name, parameter, type hints) of cls.__init__, followed by its base's where it takes **kwargs
    (a DataModule that extends another's arguments)."""
    hints = typing.get_type_hints(cls.__init__)
    params = inspect.signature(cls.__init__).parameters.values()
    for param in params:
        if param.name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            yield param.name, param, hints
    if any(p.kind == p.VAR_KEYWORD for p in params):
        base = next(b for b in cls.__mro__[1:] if "__init__" in b.__dict__)
        yield from _init_params(base)


def schema_from_signature(target: str) -> type:
    """A dataclass with `_target_ = target` and one typed field per argument of the class's __init__."""
    import importlib

    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    spec = [("_target_", str, field(default=target))]
    seen: set[str] = set()
    for pname, param, hints in _init_params(cls):
        if pname in seen:
            continue
        seen.add(pname)
        if pname not in hints:
            raise TypeError(f"{target}.__init__ argument {pname!r} needs a type annotation (it is a config key)")
        default = MISSING if param.default is inspect.Parameter.empty else param.default
        if isinstance(default, (list, dict)):
            spec.append((pname, _omegaconf_type(hints[pname]), field(default_factory=lambda d=default: type(d)(d))))
        else:
            spec.append((pname, _omegaconf_type(hints[pname]), field(default=default)))
    return make_dataclass(f"{name}Schema", spec)


def register_data_schemas(cs: ConfigStore) -> None:
    """Store every DataModule's schema as group "data" (text_schema, image_schema, ...)."""
    for store_name, target in DATA_SCHEMAS.items():
        cs.store(group="data", name=store_name, node=schema_from_signature(target))
