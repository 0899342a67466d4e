"""Language models on token streams: one builder for every memory type (the shared sequence
backbone of `cl_toolkit.kernels.backbones`, causal, so only the token mixer differs).

`TokenModel` puts a sequence language model behind the interface every strategy uses:
``model(x, t)`` maps token ids ``[B, L]`` to next-token logits ``[B, L, V]`` and leaves the
weighted auxiliary loss of that forward in ``aux_loss`` (router balance for MoM, None for
models without one).
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

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
        else:
            self.aux_loss = getattr(self.lm, "aux_loss", None)
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


def _language_model(stream, mixer: str, vocab_size: Optional[int] = None,
                    tie_embeddings: bool = True, **block_kwargs) -> TokenModel:
    """`SequenceLanguageModel` of ``mixer`` (causal) sized for ``stream``: its vocabulary by
    default and, with task routing, its task count."""
    from .kernels.backbones import SequenceLanguageModel

    check_stream_fits(stream, vocab_size, None)
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
    return TokenModel(lm, stream.vocab_size, getattr(lm, "max_len", None))


def _preset(mixer: str, keys: Sequence[str]):
    """The registry entry ``<mixer>_lm``: its signature lists the keys that mixer takes, so the
    registry refuses the others (e.g. model.topk for gdn_lm) by name."""
    from .kernels.backbones import SequenceModel

    def build(stream, **kwargs):
        return _language_model(stream, mixer, **kwargs)

    block = inspect.signature(SequenceModel.__init__).parameters
    own = list(inspect.signature(_language_model).parameters.values())
    build.__signature__ = inspect.Signature([own[0], *own[2:4]] + [block[k] for k in keys])
    build.__name__ = build.__qualname__ = f"{mixer}_lm"
    build.__doc__ = f"Causal language model with mixer={mixer!r} (keys: {', '.join(keys)})."
    build.needs_stream = True
    return build


_WIDTH = ["hidden_size", "num_layers", "num_heads", "mlp_ratio"]
_MEMORY = ["use_short_conv", "chunk_size", "backend"]
_ROUTER = ["num_memories", "topk", "shared_memory", "memory_type", "aux_loss_weight",
           "task_routing", "num_tasks", "memories_per_task", "freeze_shared"]
mom_lm = _preset("mom", _WIDTH + _ROUTER + _MEMORY)
gdn_lm = _preset("gdn", _WIDTH + _MEMORY)
gla_lm = _preset("gla", _WIDTH + _MEMORY)
transformer_lm = _preset("transformer", _WIDTH)
