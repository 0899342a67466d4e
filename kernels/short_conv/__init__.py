from .conv import segment_conv
from .naive import naive_segment_conv

__all__ = ["segment_conv", "naive_segment_conv"]
