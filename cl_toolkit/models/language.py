"""Language models on token streams: one builder for every memory type (the shared sequence
block of `cl_toolkit.models.sequence`, causal, so only the token mixer differs).

`SequenceLanguageModel` maps token ids ``[B, L]`` to next-token logits ``[B, L, V]``;
`TokenModel` puts it behind the interface every strategy uses: ``model(x, t)`` returns the
logits and leaves the weighted auxiliary loss of that forward in ``aux_loss`` (router balance
for MoM, 0 for the other mixers).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from ..layers.block import Cache
from ..validation import at_least
from .sequence import MIXER_KEYS, TASK_FREE_KEYS, SequenceModel, preset


class SequenceLanguageModel(SequenceModel):
    """Language model on the shared block: token ids [B, L] -> logits [B, L, vocab_size].

    ``forward(input_ids, t=None)`` returns logits and sets ``self.aux_loss`` (the weighted
    load-balancing loss of the MoM routers, 0 for the other mixers). ``step(input_ids,
    caches, t)`` continues a sequence from ``caches`` and returns (logits, caches): cached
    decoding, one recurrent state per memory (or the keys/values for ``transformer``).
    """

    def __init__(self, vocab_size: int, tie_embeddings: bool = True, **block_kwargs):
        super().__init__(**block_kwargs)
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, self.hidden_size)
        self.lm_head = nn.Linear(self.hidden_size, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _logits(self, input_ids, t, caches, use_cache):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids (int64 or int32), got dtype "
                             f"{input_ids.dtype}; pass the stream's ids, or .long() ids that "
                             "were stored as floats")
        # Values are checked on the CPU only: on a GPU reading them costs a device sync per
        # forward (token streams check their ids once, when they are built).
        if input_ids.device.type == "cpu" and input_ids.numel() and (
                int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}) (model vocab_size), "
                             f"got ids in [{int(input_ids.min())}, {int(input_ids.max())}]; "
                             "build the model with the stream's vocab_size")
        h, caches = self.run_blocks(self.embed(input_ids), t, caches, use_cache)
        return self.lm_head(h), caches

    def forward(self, input_ids: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._logits(input_ids, t, None, False)[0]

    def step(self, input_ids: torch.Tensor, caches: Optional[List[Cache]] = None,
             t: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[Cache]]:
        return self._logits(input_ids, t, caches, True)


class TokenModel(nn.Module):
    """Wraps a language model whose forward returns logits and sets its ``aux_loss``."""

    def __init__(self, lm: nn.Module, vocab_size: int):
        super().__init__()
        self.lm, self.vocab_size = lm, int(vocab_size)
        self.uses_task_id = bool(getattr(lm, "uses_task_id", False))
        self.aux_loss: Optional[torch.Tensor] = None

    @property
    def feat_dim(self) -> int:
        return self.lm.feat_dim

    def forward(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.lm(x, t) if self.uses_task_id else self.lm(x)
        self.aux_loss = getattr(self.lm, "aux_loss", None)
        return out


def check_stream_fits(stream, vocab_size: Optional[int]) -> None:
    """Refuse a stream that is not a token stream, or whose vocabulary a model of
    ``vocab_size`` tokens (None: the stream's) cannot take."""
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


def language_model(stream, mixer: str, vocab_size: Optional[int] = None,
                   tie_embeddings: bool = True, **block_kwargs) -> TokenModel:
    """`SequenceLanguageModel` of ``mixer`` (causal) sized for ``stream``: its vocabulary by
    default, with task routing its task count, and ``chunk_size=None``: the shortest chunk
    (16, 32 or 64) that holds a whole sequence."""
    check_stream_fits(stream, vocab_size)
    if mixer != "transformer" and block_kwargs.get("chunk_size") is None:
        block_kwargs["chunk_size"] = next(
            (c for c in (16, 32) if c >= int(stream.input_shape[0])), 64)
    if block_kwargs.get("task_routing"):
        if not stream.task_il:
            raise ConfigError(
                f"model.task_routing=true needs task ids at test time, which a "
                f"{stream.scenario} stream does not give; use benchmark.scenario=task-il or "
                "model.task_routing=false.")
        if block_kwargs.get("num_tasks") is None:
            block_kwargs["num_tasks"] = len(stream)
    try:
        lm = SequenceLanguageModel(stream.vocab_size, tie_embeddings=tie_embeddings,
                                   mixer=mixer, causal=True, **block_kwargs)
    except ValueError as exc:
        raise ConfigError(f"model={mixer}_lm: {exc}") from exc
    return TokenModel(lm, stream.vocab_size)


language_model.ranges = {"vocab_size": at_least(1)}

mom_lm = preset(language_model, "mom", "mom_lm",
                [k for k in MIXER_KEYS["mom"] if k not in TASK_FREE_KEYS],
                "Causal language model", needs_stream=True)
gdn_lm = preset(language_model, "gdn", "gdn_lm", MIXER_KEYS["gdn"], "Causal language model",
                needs_stream=True)
gla_lm = preset(language_model, "gla", "gla_lm", MIXER_KEYS["gla"], "Causal language model",
                needs_stream=True)
transformer_lm = preset(language_model, "transformer", "transformer_lm",
                        MIXER_KEYS["transformer"], "Causal language model", needs_stream=True)
