"""Models (Flax NNX)."""

from nestlearn.nn._assoc import (
    AssociativeMemory,
    LayerState,
    MemorySpec,
    MemoryState,
    ShortConv,
    initial_state,
    inner_loss,
    memory_apply,
    memory_chunked,
    memory_scan,
    memory_statistics,
)
from nestlearn.nn._attention import CausalAttention, rotary
from nestlearn.nn._cms import (
    CMSMLP,
    CMSBlock,
    ContextCMS,
    ContextCMSState,
    block_cka,
    block_cosine,
    block_forward,
    block_label,
    cms_labels,
    cms_optimizer,
    level_num_updates,
    level_steps,
    level_update_norms,
    linear_cka,
    next_step_loss,
)
from nestlearn.nn._conv import BasicBlock, Conv4, ResNet18, as_images
from nestlearn.nn._memory_models import (
    deltanet,
    hope,
    linear_attention,
    minibatch_delta,
    self_modifying_titans,
    state_size,
    titans,
    ttt_linear,
    ttt_mlp,
)
from nestlearn.nn._mlp import MLP, torch_linear_init
from nestlearn.nn._selfmod import SelfModifyingMemory
from nestlearn.nn._seq import (
    CMSChannel,
    MLPChannel,
    SequenceBlock,
    SequenceModel,
    cms_channel,
    hope_attention,
    transformer,
)
from nestlearn.nn._seqtrain import SeqTrainer, SeqTrainState, finite_mean, query_loss
from nestlearn.nn._ttt import TTTLayer, TTTState, ttt_apply, ttt_chunked, ttt_initial_state, ttt_scan

__all__ = ["MLP", "torch_linear_init"]
__all__ += ["BasicBlock", "Conv4", "ResNet18", "as_images"]
__all__ += [
    "CMSMLP",
    "CMSBlock",
    "ContextCMS",
    "ContextCMSState",
    "block_cka",
    "block_cosine",
    "block_forward",
    "block_label",
    "cms_labels",
    "cms_optimizer",
    "level_num_updates",
    "level_steps",
    "level_update_norms",
    "linear_cka",
    "next_step_loss",
]
__all__ += [
    "AssociativeMemory",
    "LayerState",
    "MemorySpec",
    "MemoryState",
    "ShortConv",
    "SelfModifyingMemory",
    "TTTLayer",
    "TTTState",
    "initial_state",
    "inner_loss",
    "memory_apply",
    "memory_chunked",
    "memory_scan",
    "memory_statistics",
    "ttt_apply",
    "ttt_chunked",
    "ttt_initial_state",
    "ttt_scan",
]
__all__ += [
    "CMSChannel",
    "CausalAttention",
    "MLPChannel",
    "SeqTrainState",
    "SeqTrainer",
    "SequenceBlock",
    "SequenceModel",
    "cms_channel",
    "deltanet",
    "finite_mean",
    "hope",
    "hope_attention",
    "linear_attention",
    "minibatch_delta",
    "query_loss",
    "rotary",
    "self_modifying_titans",
    "state_size",
    "titans",
    "transformer",
    "ttt_linear",
    "ttt_mlp",
]
