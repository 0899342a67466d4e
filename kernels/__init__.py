"""Token-mixing ops, one folder each with ``naive.py`` as its executable spec: the gated delta
rule and (gated) linear attention (chunkwise and recurrent forms, Triton and torch paths) and
the short causal convolution over packed segments; ``common/`` holds the chunk and recurrent
code the first two share. Depends only on torch (and triton for the GPU paths, imported
lazily). The layers built on these ops live in ``cl_toolkit.layers``, the models in
``cl_toolkit.models``."""
from .gated_delta_rule import (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule,
                               naive_gated_delta_rule)
from .linear_attn import chunk_linear_attn, fused_recurrent_linear_attn, naive_linear_attn
from .short_conv import naive_segment_conv, segment_conv

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
           "naive_gated_delta_rule", "chunk_linear_attn", "fused_recurrent_linear_attn",
           "naive_linear_attn", "segment_conv", "naive_segment_conv"]
