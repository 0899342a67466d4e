"""Context operators of Sculptor (Li et al. 2025, https://arxiv.org/abs/2508.04664) on the
context of a key-value stream: fragment, summarise, hide / restore (with a log), search, and the
rendering back to the token sequence a model reads.

Sculptor gives an LLM tools over its own conversation. Our small models cannot call tools, so
the operators are plain functions a *policy* calls in front of the model (see
`cl_toolkit.context.policies`). The context of a PI sequence (PI-LLM, arXiv 2506.08184,
`cl_toolkit.benchmarks.kv_interference`) is its (key, value) pairs before the queries::

    x:  0 0 | k2 a  k1 b  k2 c  k1 d | k1 k2        (left padding | context | queries)

Two layers, one meaning:

- the reference operators below work on one hand-made context (Python lists, one `Fragment`
  per piece); they are the executable spec and what the tests read;
- `parse` and `render_batch` are the batched path the policies use on ``[B, L]`` token ids:
  ``keep [B, P]`` (which of the P pairs stay) -> the rendered sequence. tests/test_context.py
  checks them against the reference operators on random sequences.

Rendering keeps the queries (and so the answer positions of ``y``) where they were: a shortened
context is left-padded back to the length ``L`` (token 0 = padding, as the stream already pads
mixed lengths). For an attention model the kept pairs are what it attends to; for a recurrent
memory (GDN, GLA, MoM) a dropped pair is never written into the state (the padding before the
first kept pair is written, as for any left-padded sequence of the stream).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

PAD = 0


@dataclass(frozen=True)
class Fragment:
    """An addressable piece of the context: ``pairs`` ((key, value) in context order) starting
    at pair index ``start``; ``summary``: it replaces the pairs ``covers`` (see `summarise`)."""

    id: int
    start: int
    pairs: tuple[tuple[int, int], ...]
    summary: bool = False
    covers: int = 0

    @property
    def keys(self) -> tuple[int, ...]:
        return tuple(k for k, _ in self.pairs)


def fragment(pairs: list[tuple[int, int]], size: int = 1) -> list[Fragment]:
    """Split a context into fragments of ``size`` consecutive pairs (``size=1``: one per
    update; the last fragment may be shorter), ids 0, 1, ... in context order."""
    if size < 1:
        raise ConfigError(f"context.window={size}: a fragment holds >= 1 pair; use 1 (one "
                          "fragment per update) or a larger window.")
    return [Fragment(i, s, tuple(pairs[s:s + size]))
            for i, s in enumerate(range(0, len(pairs), size))]


def summarise(frag: Fragment) -> Fragment:
    """What a fragment implies for the queries: the latest value of each key it holds, in the
    order of those latest updates (the earlier updates of a key are superseded)."""
    last = {k: i for i, (k, _) in enumerate(frag.pairs)}
    kept = tuple(p for i, p in enumerate(frag.pairs) if last[p[0]] == i)
    return Fragment(frag.id, frag.start, kept, summary=True, covers=len(frag.pairs))


def search(fragments: list[Fragment], key: int) -> list[int]:
    """Exact lookup: ids of the fragments that hold ``key``, latest first (by their last
    occurrence of ``key``)."""
    hits = [(f.start + max(i for i, k in enumerate(f.keys) if k == key), f.id)
            for f in fragments if key in f.keys]
    return [fid for _, fid in sorted(hits, reverse=True)]


@dataclass
class Workspace:
    """Fragments a model may read, with reversible hiding: ``hide(id, step)`` and
    ``restore(id, step)`` log ``(step, "hide" | "restore", id)``, so what was hidden when can be
    replayed; `visible` is what `render` draws. ``replace`` swaps a fragment for its summary
    (logged as ``"summarise"``)."""

    fragments: list[Fragment]
    hidden: set[int] = field(default_factory=set)
    log: list[tuple[int, str, int]] = field(default_factory=list)

    def _check(self, fid: int) -> None:
        if not 0 <= fid < len(self.fragments):
            raise KeyError(f"no fragment {fid}; ids are 0..{len(self.fragments) - 1}")

    def hide(self, fid: int, step: int = 0) -> None:
        self._check(fid)
        self.hidden.add(fid)
        self.log.append((step, "hide", fid))

    def restore(self, fid: int, step: int = 0) -> None:
        self._check(fid)
        if fid not in self.hidden:
            raise KeyError(f"fragment {fid} is not hidden; hidden: {sorted(self.hidden)}")
        self.hidden.discard(fid)
        self.log.append((step, "restore", fid))

    def replace(self, fid: int, step: int = 0) -> None:
        self._check(fid)
        self.fragments[fid] = summarise(self.fragments[fid])
        self.log.append((step, "summarise", fid))

    def hidden_at(self, step: int) -> set[int]:
        """The fragments hidden after every logged operation up to ``step`` (replayed)."""
        out: set[int] = set()
        for s, op, fid in self.log:
            if s <= step and op == "hide":
                out.add(fid)
            elif s <= step and op == "restore":
                out.discard(fid)
        return out

    def visible(self) -> list[Fragment]:
        return [f for f in self.fragments if f.id not in self.hidden]


def render(fragments: list[Fragment], queries: list[int], length: int) -> list[int]:
    """Token ids of ``fragments`` (in id order) then ``queries``, left-padded with 0 to
    ``length``."""
    body = [t for f in sorted(fragments, key=lambda f: f.id) for p in f.pairs for t in p]
    body += list(queries)
    if len(body) > length:
        raise ValueError(f"{len(body)} tokens do not fit in length {length}")
    return [PAD] * (length - len(body)) + body


def split(row: list[int], key_tokens: int) -> tuple[list[tuple[int, int]], list[int]]:
    """One left-padded PI row -> (pairs, queries): the pairs end at the last value token."""
    body = list(row)
    while body and body[0] == PAD:
        body.pop(0)
    values = [i for i, t in enumerate(body) if t >= 1 + key_tokens]
    end = values[-1] + 1 if values else 0
    ctx = body[:end]
    return [(ctx[i], ctx[i + 1]) for i in range(0, len(ctx), 2)], body[end:]


@dataclass
class Layout:
    """The parsed batch: ``keys, values [B, P]`` of the pairs (pair j of a row at token
    ``key_pos[:, j]`` and ``key_pos + 1``), ``valid [B, P]`` (rows with fewer pairs are padded
    at the right), ``n_pairs [B]``, ``query [B, L]`` (query tokens) and ``truth`` ``[B, L]``:
    at each query the queried key's last value in the full context (-1 elsewhere), which is
    the stream's label there (the reward's truth; never shown to a scorer)."""

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    key_pos: torch.Tensor
    n_pairs: torch.Tensor
    query: torch.Tensor
    truth: torch.Tensor


def parse(x: torch.Tensor, key_tokens: int) -> Layout:
    """Parse PI rows ``x [B, L]`` (left padding, (key, value) pairs, query keys); refuses
    (ValueError) a row of another layout."""
    B, L = x.shape
    pos = torch.arange(L, device=x.device).expand(B, L)
    is_val = x >= 1 + key_tokens
    is_key = (x >= 1) & ~is_val
    n = is_val.sum(1)
    P = max(int(n.max()) if B else 0, 1)
    # positions of the value tokens in order (non-values sorted after them)
    vpos = torch.where(is_val, pos, pos + L).sort(1).values[:, :P]
    valid = torch.arange(P, device=x.device)[None] < n[:, None]
    vpos = torch.where(valid, vpos, torch.ones_like(vpos))
    kpos = vpos - 1
    keys, values = x.gather(1, kpos), x.gather(1, vpos)
    nonpad = x != PAD
    first = torch.where(nonpad, pos, torch.full_like(pos, L)).min(1).values  # first token
    last_val = torch.where(is_val, pos, first[:, None] - 1).max(1).values  # context's end
    query = pos > last_val[:, None]
    span = (pos >= first[:, None]) & (pos <= last_val[:, None])
    ok = ((is_key.gather(1, kpos) | ~valid).all(1) & (is_key | ~query).all(1) &
          (nonpad | (pos < first[:, None])).all(1) & (span <= (is_key | is_val)).all(1) &
          (2 * n == last_val + 1 - first))
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0, 0])
        raise ValueError(f"row {bad} is not a left-padded sequence of (key, value) pairs then "
                         f"query keys (key tokens 1..{key_tokens}): {x[bad].tolist()}")
    # truth: at a query of key k, the value of the last valid pair with key k
    match = (x[:, :, None] == keys[:, None, :]) & valid[:, None, :] & query[:, :, None]
    last = torch.where(match, torch.arange(P, device=x.device), -1).max(2).values  # [B, L]
    truth = torch.where(last >= 0, values.gather(1, last.clamp(min=0)), -1)
    return Layout(keys, values, valid, kpos, n, query, truth)


def render_batch(x: torch.Tensor, layout: Layout, keep: torch.Tensor) -> torch.Tensor:
    """The rows of ``x [B, L]`` with only the pairs ``keep [B, P]`` (and the queries), kept
    tokens in their order and moved right, left-padded with 0: `render` of the kept pairs."""
    B, L = x.shape
    tok = layout.query.clone()
    k = (keep & layout.valid)
    rows = torch.arange(B, device=x.device)[:, None].expand_as(k)
    tok[rows[k], layout.key_pos[k]] = True
    tok[rows[k], layout.key_pos[k] + 1] = True
    pos = torch.arange(L, device=x.device).expand(B, L)
    order = torch.where(tok, pos + L, pos).sort(1).indices  # dropped first, kept in order
    out = x.gather(1, order)
    return torch.where(tok.gather(1, order), out, torch.full_like(out, PAD))


def later_same_key(layout: Layout, group: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, P]``: whether a later pair of the row updates the same key (a stale update); with
    ``group [B or 1, P]`` (e.g. each pair's fragment), only a later pair of the same group
    counts (what summarising that fragment drops)."""
    k, v = layout.keys, layout.valid
    P = k.shape[1]
    later = torch.ones(P, P, dtype=torch.bool, device=k.device).triu(1)  # [j, j'] j' > j
    same = (k[:, :, None] == k[:, None, :]) & v[:, None, :] & later
    if group is not None:
        same = same & (group[:, :, None] == group[:, None, :])
    return same.any(2)
