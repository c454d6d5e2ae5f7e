"""Checkpoint interop: transformers configs and weights in, seqdsl specs and state dicts out.

``import_config(config)`` reads a transformers config (dict, config.json, or config object) into
an :class:`Imported` with the `.seq` text of a spec (``.spec_text``); ``load_hf(target, source)``
loads a transformers model's (or state dict's) weights into a compiled seqdsl model;
``export_hf`` maps them back, exactly. transformers itself is not needed: configs are JSON and
state dicts are tensors.
"""

from seqdsl.interop.hf_config import FAMILIES, Imported, import_config
from seqdsl.interop.weights import (convert_state_dict, export_hf, export_state_dict, load_hf,
                                   read_checkpoint)

__all__ = ["import_config", "load_hf", "export_hf", "convert_state_dict", "export_state_dict",
           "read_checkpoint", "Imported", "FAMILIES"]
