from .chunk import chunk_gated_delta_rule
from .naive import naive_gated_delta_rule
from .recurrent import fused_recurrent_gated_delta_rule
from .torch_chunk import torch_chunk_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "naive_gated_delta_rule", "fused_recurrent_gated_delta_rule",
           "torch_chunk_gated_delta_rule"]
