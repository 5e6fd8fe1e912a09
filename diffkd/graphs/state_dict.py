"""State-dict transparency of CUDAGraphHead: its ``state_dict`` has the bare head's keys, and it loads them."""
from __future__ import annotations

import torch.nn as nn

HEAD_PREFIX = "head."


def strip_head_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: ``<prefix>head.X`` becomes ``<prefix>X``, in place and in order (metadata too)."""
    inner = prefix + HEAD_PREFIX
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[prefix + key[len(inner):] if key.startswith(inner) else key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        inner_name = inner[:-1]
        entries = list(metadata.items())
        metadata.clear()
        for key, value in entries:
            if key == inner_name:  # the head's own version replaces the wrapper's
                metadata[prefix[:-1]] = value
            elif key.startswith(inner):
                metadata[prefix + key[len(inner):]] = value
            elif key != prefix[:-1]:
                metadata[key] = value


def add_head_prefix(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: a bare head's keys ``<prefix>X`` are loaded as ``<prefix>head.X``."""
    inner = prefix + HEAD_PREFIX
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)
