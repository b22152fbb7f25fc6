"""Models (Flax NNX)."""

from nestlearn.nn._assoc import (
    AssociativeMemory,
    MemorySpec,
    MemoryState,
    initial_state,
    inner_loss,
    memory_apply,
    memory_chunked,
    memory_scan,
    memory_statistics,
)
from nestlearn.nn._cms import (
    CMSMLP,
    CMSBlock,
    block_cka,
    block_cosine,
    block_label,
    cms_labels,
    cms_optimizer,
    level_num_updates,
    level_steps,
    level_update_norms,
    linear_cka,
)
from nestlearn.nn._mlp import MLP, torch_linear_init
from nestlearn.nn._selfmod import SelfModifyingMemory

__all__ = ["MLP", "torch_linear_init"]
__all__ += [
    "CMSMLP",
    "CMSBlock",
    "block_cka",
    "block_cosine",
    "block_label",
    "cms_labels",
    "cms_optimizer",
    "level_num_updates",
    "level_steps",
    "level_update_norms",
    "linear_cka",
]
__all__ += [
    "AssociativeMemory",
    "MemorySpec",
    "MemoryState",
    "SelfModifyingMemory",
    "initial_state",
    "inner_loss",
    "memory_apply",
    "memory_chunked",
    "memory_scan",
    "memory_statistics",
]
