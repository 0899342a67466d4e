"""Layers on the ops of ``cl_toolkit.kernels``: the Mixture-of-Memories token mixer and its
single-memory form (``mom``), softmax attention with rotary positions (``attention``), RMSNorm
(``norm``) and the pre-norm residual block that holds any of these mixers (``block``)."""
from .attention import Attention, rotary
from .block import MIXERS, SequenceBlock, make_mixer
from .mom import GatedRMSNorm, MoMLayer, SingleMemory, switch_aux_loss
from .norm import RMSNorm

__all__ = ["Attention", "rotary", "MIXERS", "SequenceBlock", "make_mixer", "GatedRMSNorm",
           "MoMLayer", "SingleMemory", "switch_aux_loss", "RMSNorm"]
