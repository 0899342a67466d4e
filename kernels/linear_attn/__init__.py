from .chunk import chunk_linear_attn
from .naive import naive_linear_attn
from .recurrent import fused_recurrent_linear_attn
from .torch_chunk import torch_chunk_linear_attn

__all__ = ["chunk_linear_attn", "naive_linear_attn", "fused_recurrent_linear_attn",
           "torch_chunk_linear_attn"]
