"""Triton kernels + torch references for gated-delta-rule and (gated) linear-attention memories,
the Mixture-of-Memories layer and MoM backbones. Depends only on torch (and triton for the GPU
paths, imported lazily)."""
from .backbones import (MoMImageClassifierBackbone, MoMLanguageModel, SequenceImageBackbone,
                        SequenceLanguageModel)
from .gated_delta_rule import (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule,
                               naive_gated_delta_rule)
from .linear_attn import chunk_linear_attn, fused_recurrent_linear_attn, naive_linear_attn
from .mom import MoMLayer

__all__ = ["MoMImageClassifierBackbone", "MoMLanguageModel", "SequenceImageBackbone",
           "SequenceLanguageModel", "MoMLayer", "chunk_gated_delta_rule",
           "fused_recurrent_gated_delta_rule", "naive_gated_delta_rule", "chunk_linear_attn",
           "fused_recurrent_linear_attn", "naive_linear_attn"]
