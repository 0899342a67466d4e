"""Pretrained causal language models (any `transformers` ``AutoModelForCausalLM``) as backbones
of the token streams (``model=hf_lm model.model_name=gpt2``): PI (kv_interference), MQAR and the
retention probe at the scale of papers that used pretrained models (Orhan 2023,
https://arxiv.org/abs/2303.17557, studied GPT-2-class models; PI-LLM,
https://arxiv.org/abs/2506.08184, prompts LLMs with "key: value" updates).

The contract is the one of `cl_toolkit.models.language`: stream token ids ``x [B, L]`` ->
scores ``[B, L, V]`` over the *stream's* vocabulary, so the ``tokens`` task kind, the stream's
analyses and the retention probe use it unchanged, and ``train_step`` fine-tunes the LM through
the same cross-entropy.

How a stream sequence reaches the LM (all our choices, for the reasons given):

- Text form. A stream that has one carries ``TaskStream.token_text``: the text of every stream
  token id (kv_interference: "key: value" lines, MQAR: key / value words, fortunes: each byte's
  character). A token whose text is empty (padding) adds nothing to the LM's input, so a
  left-padded sequence reaches the LM exactly as the unpadded one and scores the same.
- Tokenisation. Each token's text is tokenised on its own (no special tokens) and the pieces
  are concatenated, after the tokenizer's BOS token (EOS when it has none; GPT-2 separates
  documents with it) so that every position has a context. Tokenising piece by piece makes each
  stream position end on an LM-token boundary, so "the LM after stream position i" is an exact
  LM state and every score below an exact log-probability. The cost: where a tokenizer would
  merge across positions (bytes into words, for fortunes), the LM reads an uncommon
  segmentation (one character per token), which understates what it does on its own
  tokenisation of the same text.
- Scores. At position i the score of candidate stream token v is log p_LM(tokens of v | the LM
  tokens of positions 0..i): the sum of its tokens' log-probabilities, each given the earlier
  ones (the exact joint, not the first token alone: with digits split or shared prefixes such
  as " 0", " 1", first tokens collide). The candidates' LM-token sequences must be distinct and
  prefix-free (checked at build): then "the LM writes v next" are disjoint events, so a softmax
  over the scores is the LM's own distribution restricted to the stream's tokens (a candidate
  that is a prefix of another would always score at least as high). Tokens with empty text score
  ``EMPTY_SCORE``; positions without any context (no BOS, only padding so far) score 0.
- Multi-token candidates. Their later tokens need the LM after the context *and* the
  candidate's earlier tokens. Every proper prefix of a candidate's tokens is a node of a trie;
  one forward pass appends, after the sequence, one token per (position, node), each attending
  to the sequence up to its position and to its own ancestors in the trie (a 4D attention mask;
  position ids continue from its position: the tree attention of SpecInfer,
  https://arxiv.org/abs/2305.09781, applied to scoring), so a sequence of T LM tokens and L
  positions costs one pass over T + L * N tokens (N nodes: a handful for the streams' text
  forms). A model whose attention does not honour custom 4D masks (checked once at build
  against a per-row recomputation) falls back to recomputing the prefix for every (position,
  node): exact, 20-30x slower on the test model.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ClToolkitError, ConfigError
from ..validation import at_least, one_of
from .language import check_stream_fits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Score of a candidate whose text is empty (padding): never an answer (finite, so fp16 and the
# cross-entropy stay finite).
EMPTY_SCORE = -1e4
# Config attributes that hold a model's context length, in the order we read them.
CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")
# What shortens a stream's sequences, by stream name (for the context-length error).
SHORTEN = {"mqar": "benchmark.seq_len", "fortunes": "benchmark.seq_len",
           "kv_interference": "benchmark.num_keys / train_updates / probe_updates / probe_keys"}


class HFModelNotFoundError(ClToolkitError, FileNotFoundError):
    """The model's files are neither a local directory nor in the Hugging Face cache."""

    exit_code = 2


def import_transformers():
    """``transformers`` 4.x (the ``hf`` extra). 5.x imports a top-level package named
    ``kernels``, which this repository's ``kernels/`` folder (``cl_toolkit.kernels``) shadows
    whenever Python runs from the checkout, so it is refused with the fix."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("model=hf_lm needs the transformers library; pip install "
                          "'cl_toolkit[hf]'.") from None
    if int(transformers.__version__.split(".")[0]) >= 5:
        raise ConfigError(f"model=hf_lm supports transformers 4.x; {transformers.__version__} "
                          "is installed (5.x imports a package named `kernels`, which this "
                          "repository's kernels/ folder shadows); pip install "
                          "'transformers>=4.40,<5'.")
    return transformers


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _not_found(model_name: str, cache_dir: str | None, exc: Exception) -> HFModelNotFoundError:
    why = ("HF_HUB_OFFLINE=1 forbids downloading it" if _offline() else
           "downloading it failed (offline? set HF_HUB_OFFLINE=1 to fail at once)")
    return HFModelNotFoundError(
        f"model.model_name={model_name!r} is not a local directory and is not in the Hugging "
        f"Face cache ({cache_dir or 'default cache'}), and {why}: {str(exc).splitlines()[0]} "
        f"On a machine with internet run `hf download {model_name}` (or "
        f"AutoModelForCausalLM.from_pretrained({model_name!r}) and "
        f"AutoTokenizer.from_pretrained({model_name!r})) and copy the cache "
        "(~/.cache/huggingface/hub), or pass a directory saved with save_pretrained (model and "
        "tokenizer) as model.model_name.")


def _check_causal(config, model_name: str, transformers) -> None:
    """Refuse configs without a pretrained causal-LM head: encoder-decoders, models that
    AutoModelForCausalLM does not know, and masked-LM encoders (BERT, RoBERTa, ...), whose
    causal head exists only with ``is_decoder`` and was not what they were trained as."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False) or \
            kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or \
            (kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES
             and not getattr(config, "is_decoder", False)):
        raise ConfigError(
            f"model.model_name={model_name!r} is a {kind!r} model, not a causal language model "
            f"(transformers {transformers.__version__} has no pretrained AutoModelForCausalLM "
            "for it); model=hf_lm needs a decoder-only LM such as gpt2, "
            "EleutherAI/pythia-160m, Qwen/Qwen2.5-0.5B or a local directory of one.")


def _context_length(config) -> tuple[int | None, str | None]:
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value, key
    return None, None


def _trie(pieces: list[list[int]]):
    """Pairs ``(candidate, parent node, token)``: candidate v's j-th LM token given node
    ``pieces[v][:j]`` (node 0 = the context itself), and the nodes 1..N (every proper prefix
    of a candidate's tokens) as ``token`` (its last), ``depth``, ``ancestors`` ([N, N] bool,
    self included) and ``path`` ([N, D] tokens, 0-padded)."""
    nodes: dict[tuple, int] = {(): 0}
    pairs = []
    for v, piece in enumerate(pieces):
        for j, tok in enumerate(piece):
            prefix = tuple(piece[:j])
            if prefix not in nodes:
                nodes[prefix] = len(nodes)
            pairs.append((v, nodes[prefix], tok))
    paths = sorted((p for p in nodes if p), key=nodes.get)
    n, depth = len(paths), max((len(p) for p in paths), default=0)
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    path = torch.zeros(n, max(depth, 1), dtype=torch.long)
    for p in paths:
        i = nodes[p] - 1
        path[i, :len(p)] = torch.tensor(p)
        for d in range(1, len(p) + 1):
            ancestors[i, nodes[p[:d]] - 1] = True
    cand, parent, tok = (torch.tensor(c, dtype=torch.long).reshape(-1) for c in zip(*pairs))
    return (cand, parent, tok, torch.tensor([p[-1] for p in paths], dtype=torch.long),
            torch.tensor([len(p) for p in paths], dtype=torch.long), ancestors, path)


class HFLanguageModel(nn.Module):
    """A causal LM scoring a stream's tokens (see the module doc): ``forward(x [B, L], t=None)``
    -> scores ``[B, L, V]`` (float32), V the stream's vocabulary."""

    uses_task_id = False

    def __init__(self, causal_lm: nn.Module, tokenizer, token_text, model_name: str,
                 stream_name: str = "", micro_batch: int = 16, context: int | None = None,
                 context_key: str | None = None):
        super().__init__()
        self.causal_lm, self.model_name, self.stream_name = causal_lm, model_name, stream_name
        self.micro_batch, self.context, self.context_key = int(micro_batch), context, context_key
        self.vocab_size = len(token_text)
        self.aux_loss = None
        pieces = [tokenizer.encode(text, add_special_tokens=False) if text else []
                  for text in token_text]
        self._check_pieces(token_text, pieces)
        special = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
            else tokenizer.eos_token_id
        self.prefix = [] if special is None else [int(special)]
        self.pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id)
                            if i is not None), 0)
        width = max(len(p) for p in pieces)
        table = torch.zeros(len(pieces), width, dtype=torch.long)
        for v, p in enumerate(pieces):
            table[v, :len(p)] = torch.tensor(p, dtype=torch.long)
        cand, parent, tok, node_token, depth, ancestors, path = _trie(pieces)
        buffers = {"piece_table": table,
                   "piece_len": torch.tensor([len(p) for p in pieces], dtype=torch.long),
                   "empty": torch.tensor([not p for p in pieces]), "pair_cand": cand,
                   "pair_parent": parent, "pair_tok": tok, "node_token": node_token,
                   "node_depth": depth, "node_ancestors": ancestors, "node_path": path}
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)
        self.max_depth = int(depth.max()) if len(depth) else 0
        self.packed = True  # set by check_packing

    @property
    def num_nodes(self) -> int:
        return len(self.node_token)

    def _check_pieces(self, token_text, pieces) -> None:
        """Non-empty texts must become distinct, prefix-free LM-token sequences."""
        seen: dict[tuple, int] = {}
        for v, p in enumerate(pieces):
            if token_text[v] and not p:
                raise ConfigError(
                    f"model.model_name={self.model_name!r}: its tokenizer turns the text "
                    f"{token_text[v]!r} of stream token {v} into no tokens; use a tokenizer that "
                    "covers every character (a byte-level BPE such as gpt2's).")
            if p:
                seen.setdefault(tuple(p), v)
        keys = sorted(seen)
        for a, b in itertools.pairwise(keys):  # sorted: a prefix sits right before an extension
            if b[:len(a)] == a:
                raise ConfigError(
                    f"model.model_name={self.model_name!r}: stream tokens {seen[a]} "
                    f"({token_text[seen[a]]!r}) and {seen[b]} ({token_text[seen[b]]!r}) become "
                    f"LM tokens {list(a)} and {list(b)}, one a prefix of the other, so their "
                    "scores would not compare; use a tokenizer that keeps them apart (a "
                    "byte-level BPE such as gpt2's), or a stream text form whose token texts "
                    "have one length per kind.")
        dup = len([p for p in pieces if p]) - len(seen)
        if dup:
            same = next(v for v, p in enumerate(pieces) if p and seen[tuple(p)] != v)
            first = seen[tuple(pieces[same])]
            raise ConfigError(
                f"model.model_name={self.model_name!r}: its tokenizer gives stream tokens {first} "
                f"({token_text[first]!r}) and {same} ({token_text[same]!r}) the same LM tokens "
                f"{pieces[same]} ({dup} such collisions), so they could not be told apart; use a "
                "tokenizer that covers every character (a byte-level BPE such as gpt2's).")

    def render(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LM token ids ``[B, T]`` (right-padded), their lengths ``[B]`` and ``ends [B, L]``:
        the index of the last LM token of stream positions 0..i (-1: none yet)."""
        nb = len(self.prefix)
        lens = self.piece_len[x]
        cum = lens.cumsum(1)
        lengths = cum[:, -1] + nb
        T = max(int(lengths.max()), 1)
        self.check_length(T, x.shape[1])
        ids = torch.full((x.shape[0], T), self.pad_id, dtype=torch.long, device=x.device)
        if nb:
            ids[:, 0] = self.prefix[0]
        j = torch.arange(self.piece_table.shape[1], device=x.device)
        pos = (cum - lens + nb)[..., None] + j
        valid = j < lens[..., None]
        rows = torch.arange(x.shape[0], device=x.device)[:, None, None].expand_as(pos)
        ids[rows[valid], pos[valid]] = self.piece_table[x][valid]
        return ids, lengths, cum + nb - 1

    def check_length(self, lm_tokens: int, stream_tokens: int) -> None:
        need = lm_tokens + self.max_depth
        if self.context is not None and need > self.context:
            raise ConfigError(
                f"model=hf_lm: a sequence of {stream_tokens} tokens of benchmark "
                f"{self.stream_name!r} becomes {lm_tokens} tokens of {self.model_name!r}'s "
                f"tokenizer (+{self.max_depth} for the longest answer), more than its context of "
                f"{self.context} positions (config.{self.context_key}). Shorten the sequences ("
                f"{SHORTEN.get(self.stream_name, 'the benchmark sequence length')}) or use a "
                "model with a longer context.")

    def _lm(self, ids, attention_mask, position_ids=None) -> torch.Tensor:
        kwargs = {} if position_ids is None else {"position_ids": position_ids}
        return self.causal_lm(input_ids=ids, attention_mask=attention_mask, use_cache=False,
                              **kwargs).logits

    def _packed(self, ids, lengths, ends):
        """One pass: the sequence, then one token per (position, trie node). Returns the
        logits ``[M, V_lm]`` and, per (b, i, node), its row ``[B, L, N + 1]``."""
        B, T = ids.shape
        L, N, dev = ends.shape[1], self.num_nodes, ids.device
        S = T + L * N
        q = torch.arange(T, device=dev)
        main = (q[None, :] <= q[:, None]) & ((q[None, None, :] < lengths[:, None, None])
                                            | (q[None, :] == q[:, None]))
        allowed = torch.zeros(B, S, S, dtype=torch.bool, device=dev)
        allowed[:, :T, :T] = main
        allowed[:, T:, :T] = (q <= ends[..., None, None]).expand(B, L, N, T).reshape(B, L * N, T)
        allowed[:, T:, T:] = torch.block_diag(*[self.node_ancestors] * L)
        if getattr(self.causal_lm.config, "_attn_implementation", None) == "sdpa":
            mask = allowed[:, None]  # SDPA's own format (True: attend), whatever autocast does
        else:  # eager attention adds the mask to its scores
            dtype = next(self.causal_lm.parameters()).dtype
            mask = torch.zeros(B, 1, S, S, dtype=dtype, device=dev).masked_fill(
                ~allowed[:, None], torch.finfo(dtype).min)
        inputs = torch.cat([ids, self.node_token.repeat(L).expand(B, L * N)], 1)
        extra = (ends[..., None] + self.node_depth).reshape(B, L * N)
        positions = torch.cat([q.expand(B, T), extra.clamp(min=0)], 1)
        logits = self._lm(inputs, mask, positions)
        b = torch.arange(B, device=dev)[:, None, None] * S
        slots = T + torch.arange(L, device=dev)[:, None] * N + torch.arange(N, device=dev)
        index = torch.cat([ends.clamp(min=0)[..., None], slots.expand(B, L, N)], 2) + b
        return logits.reshape(B * S, -1), index

    def _rows(self, ids, lengths, ends):
        """As `_packed`, recomputing the prefix for every (position, node): any causal LM."""
        B, T = ids.shape
        L, N, dev = ends.shape[1], self.num_nodes, ids.device
        q = torch.arange(T, device=dev)
        main = self._lm(ids, (q < lengths[:, None]).long())
        parts = [main.reshape(B * T, -1)]
        if N:
            rb = torch.arange(B, device=dev).repeat_interleave(L * N)
            ri = torch.arange(L, device=dev).repeat_interleave(N).repeat(B)
            rn = torch.arange(N, device=dev).repeat(B * L)
            e, d = ends[rb, ri], self.node_depth[rn]
            width = T + self.node_path.shape[1]
            k = torch.arange(width, device=dev)
            rows = torch.cat([ids[rb], ids.new_full((len(rb), width - T), self.pad_id)], 1)
            rows = rows.masked_fill(k > e[:, None], self.pad_id)
            j = torch.arange(self.node_path.shape[1], device=dev)
            at, put = e[:, None] + 1 + j, j < d[:, None]
            r = torch.arange(len(rb), device=dev)[:, None].expand_as(at)
            rows[r[put], at[put]] = self.node_path[rn][put]
            last = e + d
            chunk = max(1, self.micro_batch * 8)
            for s in range(0, len(rows), chunk):
                out = self._lm(rows[s:s + chunk], (k <= last[s:s + chunk, None]).long())
                parts.append(out[torch.arange(len(out), device=dev), last[s:s + chunk]])
        main_rows = torch.arange(B, device=dev)[:, None] * T + ends.clamp(min=0)
        index = torch.cat([main_rows[..., None],
                           B * T + torch.arange(B * L * N, device=dev).view(B, L, N)], 2)
        return torch.cat(parts), index

    def _scores(self, x: torch.Tensor, packed: bool) -> torch.Tensor:
        ids, lengths, ends = self.render(x)
        if packed and self.num_nodes:
            flat, index = self._packed(ids, lengths, ends)
        else:
            flat, index = self._rows(ids, lengths, ends)
        at = index[..., self.pair_parent]  # [B, L, P]
        flat = flat.float()
        logp = flat[at, self.pair_tok] - torch.logsumexp(flat, -1)[at]
        scores = torch.zeros(*x.shape, self.vocab_size, device=x.device).index_add(
            2, self.pair_cand, logp)
        scores = torch.where((ends < 0)[..., None], torch.zeros_like(scores), scores)
        return scores.masked_fill(self.empty, EMPTY_SCORE)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"hf_lm takes stream token ids [B, L] (int64); got {x.dtype} "
                             f"{tuple(x.shape)}")
        x = x.long()
        return torch.cat([self._scores(x[s:s + self.micro_batch], self.packed)
                          for s in range(0, len(x), self.micro_batch)])

    @torch.no_grad()
    def check_packing(self, x: torch.Tensor, atol: float) -> None:
        """Use the packed pass only where it gives the per-row scores on ``x`` (a model whose
        attention ignores or rejects a custom 4D mask falls back to rows)."""
        if not self.num_nodes:
            return
        was = self.training
        self.eval()
        try:
            ok = torch.allclose(self._scores(x, True), self._scores(x, False), atol=atol)
        except (RuntimeError, ValueError, TypeError, IndexError):
            ok = False  # the model's attention rejects the mask
        finally:
            self.train(was)
        self.packed = ok

    def memory_bytes(self) -> int:
        """No task-owned parameters (see `SequenceModel.memory_bytes`)."""
        return 0


def hf_lm(stream, model_name: str = "gpt2", pretrained: bool = True,
          revision: str | None = None, cache_dir: str | None = None, dtype: str = "float32",
          micro_batch: int = 16) -> HFLanguageModel:
    """A transformers causal LM over ``stream``'s text form (see the module doc).
    ``model_name``: a hub id in the cache (or downloadable) or a directory saved with
    ``save_pretrained`` (model and tokenizer); ``pretrained=false``: the same architecture with
    random weights (only its config and tokenizer are read); ``micro_batch``: sequences per LM
    pass (memory grows with it x sequence length x (1 + trie nodes) x the LM's vocabulary)."""
    check_stream_fits(stream, None)
    text = getattr(stream, "token_text", None)
    if text is None:
        raise ConfigError(
            f"model=hf_lm reads a stream as text, but benchmark {stream.name!r} has no text form "
            "(TaskStream.token_text); use benchmark=kv_interference, mqar or fortunes, or give "
            "the stream's builder a token_text (the text of every token id).")
    if len(text) != stream.vocab_size:
        raise ConfigError(f"benchmark {stream.name!r} gives {len(text)} token texts for a "
                          f"vocabulary of {stream.vocab_size}; its token_text needs one per id.")
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r}; use one of {', '.join(DTYPES)}.")
    transformers = import_transformers()
    local = Path(model_name).expanduser()
    if model_name.startswith((".", "/", "~")) and not local.is_dir():
        raise ConfigError(f"model.model_name={model_name!r} looks like a path but is not a "
                          "directory; give a directory saved with save_pretrained, or a hub id.")
    source = str(local) if local.is_dir() else model_name
    where = {"revision": revision, "cache_dir": cache_dir}
    try:
        config = transformers.AutoConfig.from_pretrained(source, **where)
    except OSError as exc:
        raise _not_found(model_name, cache_dir, exc) from None
    except ValueError as exc:
        raise ConfigError(f"model.model_name={model_name!r} is not a transformers model "
                          f"({str(exc).splitlines()[0]}); give a causal LM's hub id or "
                          "directory.") from None
    _check_causal(config, model_name, transformers)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **where)
        auto = transformers.AutoModelForCausalLM
        if pretrained:
            lm = auto.from_pretrained(source, config=config, **where, **_dtype(transformers,
                                                                            DTYPES[dtype]))
        else:
            lm = auto.from_config(config).to(DTYPES[dtype])
    except OSError as exc:
        raise _not_found(model_name, cache_dir, exc) from None
    context, key = _context_length(config)
    model = HFLanguageModel(lm, tokenizer, tuple(text), model_name, stream.name, micro_batch,
                            context, key)
    for task in stream:  # every sequence the run trains and tests on must fit the context
        for data in (task.train, task.test):
            if len(data):
                longest = int(model.piece_len[data.x].sum(1).max()) + len(model.prefix)
                model.check_length(longest, data.x.shape[1])
    probe = stream[0].test.x[:2] if len(stream[0].test) else stream[0].train.x[:2]
    model.check_packing(probe, 1e-3 if dtype == "float32" else 5e-2)
    return model


def _dtype(transformers, dtype: torch.dtype) -> dict:
    """The weights' dtype keyword: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


hf_lm.needs_stream = True
hf_lm.ranges = {"micro_batch": at_least(1), "dtype": one_of(*DTYPES)}
