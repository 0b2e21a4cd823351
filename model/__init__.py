"""Flax linen model: `ModelConfig`, `Transformer`, decoding cache, MoE balancing, sharding."""

from model.config import ModelConfig
from model.moe import max_violation, update_router_bias
from model.sharding import LOGICAL_RULES, make_mesh
from model.transformer import (
    AttentionParamPaths,
    Transformer,
    attention_param_paths,
    init_cache,
    moe_bias_paths,
    update_router_biases,
)

__all__ = [
    "LOGICAL_RULES",
    "AttentionParamPaths",
    "ModelConfig",
    "Transformer",
    "attention_param_paths",
    "init_cache",
    "make_mesh",
    "max_violation",
    "moe_bias_paths",
    "update_router_bias",
    "update_router_biases",
]
