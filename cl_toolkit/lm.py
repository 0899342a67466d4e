"""Language models on token streams: one builder for every memory type.

`TokenModel` puts a sequence language model behind the interface every strategy uses:
``model(x, t)`` maps token ids ``[B, L]`` to next-token logits ``[B, L, V]`` and leaves the
weighted auxiliary loss of that forward in ``aux_loss`` (router balance for MoM, None for
models without one).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import nn

from .errors import ConfigError


class TokenModel(nn.Module):
    """Wraps a language model whose forward returns logits or ``(logits, aux_loss, ...)``.

    ``max_len`` is the longest sequence the model can take (None: any length)."""

    def __init__(self, lm: nn.Module, vocab_size: int, max_len: Optional[int] = None):
        super().__init__()
        self.lm, self.vocab_size, self.max_len = lm, int(vocab_size), max_len
        self.uses_task_id = bool(getattr(lm, "uses_task_id", False))
        self.aux_loss: Optional[torch.Tensor] = None

    @property
    def feat_dim(self) -> int:
        return self.lm.feat_dim

    def forward(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.lm(x, t) if self.uses_task_id else self.lm(x)
        if isinstance(out, tuple):
            out, self.aux_loss = out[0], out[1]
        return out


def check_stream_fits(stream, vocab_size: Optional[int], max_len: Optional[int]) -> None:
    """Refuse a token stream whose vocabulary or sequence length a model of ``vocab_size``
    tokens (None: the stream's) and ``max_len`` positions (None: any) cannot take."""
    name = stream.name
    if not stream.is_tokens:
        raise ConfigError(
            f"A language model needs a token stream, but benchmark {name!r} holds inputs of "
            f"shape {list(stream.input_shape)}; use benchmark=mqar or benchmark=kv_interference,"
            " or an image model (model=mlp, cnn, mom, ...).")
    if vocab_size is not None and stream.vocab_size != vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab_size} but benchmark {name!r} has "
            f"vocab_size={stream.vocab_size}; drop model.vocab_size (it defaults to the "
            "stream's) or set benchmark.vocab_size to match.")
    seq_len = int(stream.input_shape[0])
    if max_len is not None and seq_len > max_len:
        raise ConfigError(
            f"benchmark {name!r} has sequences of {seq_len} tokens but the model takes at most "
            f"model.max_len={max_len}; raise model.max_len or shorten the sequences "
            "(benchmark.seq_len / number of pairs or updates).")


MIXERS = ("mom", "gdn", "gla", "transformer")


def language_model(stream, mixer: str = "mom", vocab_size: Optional[int] = None,
                   hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                   num_memories: int = 4, topk: int = 2, shared_memory: bool = True,
                   task_routing: bool = False, memories_per_task: int = 2,
                   aux_loss_weight: float = 0.01, max_len: Optional[int] = None,
                   backend: str = "auto") -> TokenModel:
    """The language model of ``mixer`` sized for ``stream`` (its vocabulary by default).

    mom: MoM (https://arxiv.org/abs/2502.13685), ``num_memories`` routed gated-delta memories,
    ``topk`` per token, plus a shared one; gdn: one gated-delta-rule memory
    (https://arxiv.org/abs/2412.06464); gla: one gated-linear-attention memory
    (https://arxiv.org/abs/2312.06635). The memory options apply to mom only."""
    from .errors import unknown_name
    from .kernels.backbones import MoMLanguageModel

    if mixer not in MIXERS:
        raise unknown_name("model.mixer", mixer, list(MIXERS))
    check_stream_fits(stream, vocab_size, max_len)
    vocab = stream.vocab_size
    common = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                  backend=backend)
    if mixer == "mom":
        lm = MoMLanguageModel(vocab, num_memories=num_memories, topk=topk,
                              shared_memory=shared_memory, task_routing=task_routing,
                              num_tasks=len(stream), memories_per_task=memories_per_task,
                              aux_loss_weight=aux_loss_weight, **common)
    elif mixer in ("gdn", "gla"):
        lm = MoMLanguageModel(vocab, num_memories=1, topk=1, shared_memory=False,
                              memory_type="gated_delta" if mixer == "gdn" else "gla",
                              aux_loss_weight=0.0, **common)
    else:
        raise ConfigError("model.mixer=transformer needs the shared sequence backbone.")
    return TokenModel(lm, vocab, max_len)


def _preset(mixer: str):
    """The registry entry ``<mixer>_lm``: `language_model` with its mixer fixed."""
    build = partial(language_model, mixer=mixer)
    build.needs_stream = True
    return build


mom_lm, gdn_lm, gla_lm, transformer_lm = (_preset(m) for m in MIXERS)
