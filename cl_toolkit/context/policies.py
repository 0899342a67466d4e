"""Context policies (config group ``context``): which fragments of a PI context the model reads.

Sculptor (Li et al. 2025, https://arxiv.org/abs/2508.04664) lets the model decide with tools;
here a policy decides, batched over ``[B, L]`` token ids, and returns ``keep [B, P]`` over the
P (key, value) pairs of each row (`cl_toolkit.context.operators.parse`) plus the operations it
made per row (fragments made, searches, hides, summaries) for the measurement.

- `NoContext` (``none``): keeps everything: the baseline (the rows are left as they are).
- `Oracle` (``oracle``): per key, `search` its fragments and keep only the latest one (one
  fragment per update): each key's last update, the upper bound of any policy for a reader
  that answers with the latest value it sees.
- `Recency` (``recency``): keep the last ``keep`` fragments of ``window`` pairs each
  (optionally `summarise` them).
- `Learned` (``learned``): a small scorer over per-update fragments trained by policy gradient
  on answer accuracy minus a penalty on the context kept (see its docstring).

``during``: ``test`` (Sculptor's training-free setting: the backbone trains on full contexts and
the policy acts on what it reads at test time) or ``train_and_test`` (the backbone's training
inputs go through the policy too).
"""
from __future__ import annotations

import contextlib
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..trainer import Trainer
from .operators import Layout, later_same_key

DURING = ("test", "train_and_test")


def _check_during(during: str) -> None:
    if during not in DURING:
        raise ConfigError(f"context.during={during!r}; choose test (the policy acts on what the "
                          "model reads at test time only, Sculptor's training-free setting) or "
                          "train_and_test.")


class Policy:
    """Base class: ``decide(layout) -> (keep [B, P], ops {name: [B] counts})``."""

    name = "policy"

    def __init__(self, during: str = "test"):
        _check_during(during)
        self.during = during

    def decide(self, layout: Layout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class NoContext(Policy):
    """Keeps every pair: the baseline (identical to running without a context layer)."""

    name = "none"

    def __init__(self, during: str = "test"):
        super().__init__(during)

    def decide(self, layout):
        zero = torch.zeros_like(layout.n_pairs)
        return layout.valid.clone(), {"fragments": zero, "searches": zero, "hides": zero,
                                      "summaries": zero}


class Oracle(Policy):
    """One fragment per update; for each key, `search` returns its fragments latest first and
    every one but the first is hidden: exactly each key's last update is kept."""

    name = "oracle"

    def __init__(self, during: str = "test"):
        super().__init__(during)

    def decide(self, layout):
        keep = layout.valid & ~later_same_key(layout)
        n_keys = keep.sum(1)  # one search per distinct key of the context
        return keep, {"fragments": layout.n_pairs.clone(), "searches": n_keys,
                      "hides": layout.n_pairs - n_keys, "summaries": torch.zeros_like(n_keys)}


class Recency(Policy):
    """Keep the last ``keep`` fragments of ``window`` consecutive pairs (windows counted from
    the start of the context, as `operators.fragment` cuts them); ``summarise=true`` replaces
    each kept window by its summary (the latest value of each key in it)."""

    name = "recency"

    def __init__(self, keep: int = 2, window: int = 1, summarise: bool = False,
                 during: str = "test"):
        super().__init__(during)
        for key, v in (("keep", keep), ("window", window)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"context.{key}={v!r} must be an integer >= 1, e.g. "
                                  f"context.{key}=2.")
        self.keep, self.window, self.summarise = keep, window, bool(summarise)

    def decide(self, layout):
        P = layout.keys.shape[1]
        j = torch.arange(P, device=layout.keys.device)[None]
        frag = j // self.window
        n_frag = (layout.n_pairs + self.window - 1) // self.window
        kept_frag = frag >= (n_frag - self.keep)[:, None]
        keep = layout.valid & kept_frag
        n_kept = torch.minimum(n_frag, torch.full_like(n_frag, self.keep))
        summaries = torch.zeros_like(n_frag)
        if self.summarise:
            keep = keep & ~later_same_key(layout, frag)
            summaries = n_kept
        return keep, {"fragments": n_frag, "searches": torch.zeros_like(n_frag),
                      "hides": n_frag - n_kept, "summaries": summaries}


class Scorer(nn.Module):
    """Keep-logits ``[B, P]`` of per-update fragments from their key tokens and positions.

    A tiny attention over the fragments: each fragment's key embedding ``e_i`` is projected
    (query and key projections tied, compared by cosine: our choice) and compared with every
    *later* fragment's, ``m_i = sum_{j > i} sigmoid(a cos(W e_i, W e_j) + b)`` (a soft count
    of the later fragments it attends to), and an MLP maps ``[m_i, log(1 + m_i), distance from
    the end / n (the row's pairs), log(1 + distance)]`` to the logit. The oracle's rule (keep
    iff no later update of the same key) is representable but not given: equal keys have cosine 1 (as in any
    attention with tied projections), but how similar counts (``a``, ``b``, ``W``, the
    embeddings), the sign of the effect and its mix with recency (the MLP) are learned from the
    reward alone, and a scorer that ignored ``m`` would be a recency rule. Values are not read
    (our choice: Sculptor's search also goes by key)."""

    def __init__(self, key_tokens: int, dim: int = 16, hidden: int = 16):
        super().__init__()
        self.embed = nn.Embedding(key_tokens + 1, dim)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.a = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(0.0))
        self.mlp = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.dim = dim

    def forward(self, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        P = keys.shape[1]
        h = nn.functional.normalize(
            self.proj(self.embed(keys.clamp(max=self.embed.num_embeddings - 1))), dim=-1)
        sim = h @ h.transpose(1, 2)  # [B, P, P], cosine
        later = torch.ones(P, P, dtype=torch.bool, device=keys.device).triu(1)
        gate = torch.sigmoid(self.a * sim + self.b) * (later & valid[:, None, :])
        m = gate.sum(2)
        n = valid.sum(1, keepdim=True)
        dist = (n - 1 - torch.arange(P, device=keys.device)[None]).clamp(min=0).float()
        feats = torch.stack([m, torch.log1p(m), dist / n.clamp(min=1), torch.log1p(dist)], -1)
        return self.mlp(feats)[..., 0]


class Learned(Policy):
    """A `Scorer` over per-update fragments, trained by policy gradient (REINFORCE with a group
    baseline, as GRPO: ``rollouts`` keep-masks sampled per sequence, each fragment kept with
    probability ``sigmoid(logit)``; the advantage of a rollout is its reward minus the mean
    reward of its group, divided by the group's standard deviation (+ 1e-3), as GRPO does; no
    ratio clipping or KL: one step per batch, on-policy).

    Reward of a rollout: the share of the sequence's queries the backbone answers right from
    the kept context, minus ``penalty * max(0, share of pairs kept - budget)`` (``budget``: the
    share of the context kept free of charge). Required: ``budget`` (null is refused). At test
    time a fragment is kept iff its logit > 0 (deterministic).

    When it trains (our choice): after the last epoch of each training fit (each task), for
    ``steps`` steps on the inputs of that fit's last ``steps`` training batches, against the
    backbone as trained then (``online=true`` adds one step on every training batch as well,
    against the backbone's current answers). The scorer has its own optimiser (Adam, ``lr``)
    and its own random generator (``seed``); the backbone's rollout forwards run in eval mode
    without gradients under a forked global RNG, so with ``during=test`` the backbone trains
    bit-identically to ``context=none``."""

    name = "learned"
    smoke: ClassVar[dict] = {"steps": 3, "rollouts": 2}  # smoke=true: a few scorer steps

    def __init__(self, budget: float | None = None, penalty: float = 0.5, rollouts: int = 4,
                 steps: int = 300, online: bool = False, lr: float = 0.03, dim: int = 16,
                 hidden: int = 16, seed: int = 0, during: str = "test"):
        super().__init__(during)
        if budget is None:
            raise ConfigError("context=learned needs a context budget: set context.budget to "
                              "the share of the context kept free of charge (0 <= budget <= 1, "
                              "e.g. context.budget=0: every kept pair costs context.penalty / "
                              "its number of pairs).")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or \
                not 0 <= budget <= 1:
            raise ConfigError(f"context.budget={budget!r} must be a share in [0, 1], e.g. "
                              "context.budget=0.25.")
        if not isinstance(penalty, (int, float)) or penalty < 0:
            raise ConfigError(f"context.penalty={penalty!r} must be >= 0, e.g. 0.5.")
        for key, v in (("rollouts", rollouts), ("steps", steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if key == "rollouts" else 0):
                raise ConfigError(f"context.{key}={v!r} must be an integer >= "
                                  f"{2 if key == 'rollouts' else 0} (a group baseline needs "
                                  "two rollouts or more).")
        if not lr > 0:
            raise ConfigError(f"context.lr={lr!r} must be > 0, e.g. 0.01.")
        self.budget, self.penalty, self.rollouts = float(budget), float(penalty), rollouts
        self.steps, self.online, self.lr, self.dim, self.hidden = steps, online, lr, dim, hidden
        self.seed = seed
        self.scorer: Scorer | None = None
        self.trained_steps = 0

    def build(self, key_tokens: int, device=None) -> None:
        """The scorer, initialised from its own seed (the global RNG is left untouched)."""
        with torch.random.fork_rng():
            torch.manual_seed(self.seed + 104729)
            self.scorer = Scorer(key_tokens, self.dim, self.hidden)
        self.generator = torch.Generator().manual_seed(self.seed + 1299709)
        self.optimizer = torch.optim.Adam(self.scorer.parameters(), lr=self.lr)

    def logits(self, layout: Layout) -> torch.Tensor:
        return self.scorer(layout.keys, layout.valid)

    @torch.no_grad()
    def decide(self, layout):
        keep = layout.valid & (self.logits(layout) > 0)
        kept = keep.sum(1)
        return keep, {"fragments": layout.n_pairs.clone(),
                      "searches": torch.zeros_like(kept), "hides": layout.n_pairs - kept,
                      "summaries": torch.zeros_like(kept)}

    def reward(self, accuracy: torch.Tensor, keep: torch.Tensor, layout: Layout) -> torch.Tensor:
        """``accuracy [..., B]`` of each rollout minus the penalty on its kept share."""
        share = keep.sum(-1).float() / layout.n_pairs.clamp(min=1).float()
        return accuracy - self.penalty * (share - self.budget).clamp(min=0)

    def step(self, layout: Layout, accuracy_of) -> dict:
        """One policy-gradient step on a batch: ``accuracy_of(keep [G, B, P]) -> [G, B]`` is the
        share of each rollout's queries answered right (the backbone, or a test's reader)."""
        logit = self.logits(layout)
        p = torch.sigmoid(logit).detach().cpu()
        G = self.rollouts
        u = torch.rand((G,) + tuple(p.shape), generator=self.generator)
        keep = ((u < p).to(layout.valid.device) & layout.valid)
        with torch.no_grad():
            r = self.reward(accuracy_of(keep).float(), keep, layout)  # [G, B]
        adv = (r - r.mean(0, keepdim=True)) / (r.std(0, keepdim=True) + 1e-3)
        logp = torch.where(keep, nn.functional.logsigmoid(logit),
                           nn.functional.logsigmoid(-logit)) * layout.valid
        # through the one training step (cl_toolkit/trainer.py): its NaN guard, no clipping
        Trainer(ctx=None).step(lambda: -(adv[..., None] * logp).sum(-1).mean(), self.optimizer,
                               model=None, where="the context=learned scorer's step",
                               lr_key="context.lr", grad_clip=None)
        self.optimizer.zero_grad(set_to_none=True)
        self.trained_steps += 1
        return {"reward": float(r.mean()), "kept": float(keep.sum() / (G * layout.valid.sum()))}


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode without gradients, under a forked global RNG."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng():
            yield
    finally:
        module.train(was)
