"""The context layer in front of a language model (Sculptor, https://arxiv.org/abs/2508.04664,
as a layer: our small models cannot call tools) and its measurement on the PI stream.

`ContextManaged` keeps the model contract the runner and the strategies use (``model(x, t)``
-> logits ``[B, L, V]``, ``aux_loss``, ``uses_task_id``, ``end_epoch``, ``memory_bytes``,
``task_scores``): it parses each batch ``x [B, L]``, lets the policy choose the pairs to keep
and hands the backbone the re-rendered rows (queries, and so the answer positions of ``y``, in
place). `attach` builds it from ``cfg["context"]`` and wraps the stream's ``kv_interference``
analysis so that every probe point also reports the share of context kept, the operations per
sequence and the agreement with the oracle's rule (``extras["kv_interference"]["context"]``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import registry
from ..errors import ClToolkitError, ConfigError
from .operators import later_same_key, parse, render_batch
from .policies import Learned, Policy, evaluating

OPS = ("fragments", "searches", "hides", "summaries")


class ContextManaged(nn.Module):
    """``policy`` in front of ``model`` (a `TokenModel`) on PI rows with ``key_tokens`` key
    tokens. Test-time forwards (eval mode) always go through the policy; training forwards
    only with ``policy.during == "train_and_test"``."""

    def __init__(self, model: nn.Module, policy: Policy, key_tokens: int):
        super().__init__()
        self.model, self.policy, self.key_tokens = model, policy, int(key_tokens)
        self.uses_task_id = bool(getattr(model, "uses_task_id", False))
        self.trains_with_task_id = bool(getattr(model, "trains_with_task_id", False))
        self.aux_loss = None
        if isinstance(policy, Learned):
            if policy.scorer is None:
                policy.build(self.key_tokens)
            self.scorer = policy.scorer  # a submodule: saved in checkpoints, moved to the device
            self._inputs: list[tuple[torch.Tensor, Any]] = []
        self.scorer_log: list[dict] = []

    @property
    def feat_dim(self) -> int:
        return self.model.feat_dim

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The rows the backbone reads under the policy (``[B, L]``, same length)."""
        layout = parse(x, self.key_tokens)
        keep, _ = self.policy.decide(layout)
        return render_batch(x, layout, keep)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        learned = isinstance(self.policy, Learned)
        if self.training and learned:
            if self.policy.online:
                self._scorer_step(x, t)
            self._inputs = (self._inputs + [(x.detach(), t)])[-max(self.policy.steps, 1):]
        if not self.training or self.policy.during == "train_and_test":
            with torch.no_grad():
                x = self.transform(x)
        out = self.model(x, t)
        self.aux_loss = getattr(self.model, "aux_loss", None)
        return out

    def answers(self, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """The backbone's argmax answers ``[B, L]`` to rows ``x`` as given (no policy)."""
        with evaluating(self.model):
            return self.model(x, t).argmax(-1)

    def _scorer_step(self, x: torch.Tensor, t) -> dict:
        layout = parse(x, self.key_tokens)
        G = self.policy.rollouts

        def accuracy_of(keep: torch.Tensor) -> torch.Tensor:  # keep [G, B, P] -> [G, B]
            xs = torch.cat([render_batch(x, layout, k) for k in keep])
            ts = None if t is None else t.repeat(G)
            pred = self.answers(xs, ts).view(G, *x.shape)
            right = (pred == layout.truth) & layout.query
            return right.sum(-1).float() / layout.query.sum(-1).clamp(min=1).float()

        with torch.enable_grad():
            info = self.policy.step(layout, accuracy_of)
        self.scorer_log.append(info)
        return info

    def end_epoch(self, epoch: int, epochs: int) -> None:
        """The backbone's epoch boundary; after the last epoch of a fit, the learned scorer's
        ``steps`` steps on that fit's last training inputs against the trained backbone."""
        inner = getattr(self.model, "end_epoch", None)
        if inner is not None:
            inner(epoch, epochs)
        if isinstance(self.policy, Learned) and epoch == epochs - 1 and self._inputs:
            inputs, self._inputs = self._inputs, []
            for i in range(self.policy.steps):
                x, t = inputs[i % len(inputs)]
                self._scorer_step(x, t)

    def get_extra_state(self) -> dict:
        """What a checkpoint needs besides the scorer's weights so that a resumed run goes on
        as if uninterrupted: its optimiser, generator, step count and log."""
        if not isinstance(self.policy, Learned):
            return {}
        return {"optimizer": self.policy.optimizer.state_dict(),
                "generator": self.policy.generator.get_state(),
                "trained_steps": self.policy.trained_steps, "scorer_log": self.scorer_log}

    def set_extra_state(self, state: dict) -> None:
        if state and isinstance(self.policy, Learned):
            self.policy.optimizer.load_state_dict(state["optimizer"])
            self.policy.generator.set_state(state["generator"])
            self.policy.trained_steps = int(state["trained_steps"])
            self.scorer_log = list(state["scorer_log"])

    def memory_bytes(self) -> int:
        fn = getattr(self.model, "memory_bytes", None)
        return int(fn()) if callable(fn) else 0

    def task_scores(self, stream, score) -> dict:
        fn = getattr(self.model, "task_scores", None)
        return fn(stream, score) if callable(fn) else {}


def _stats(policy: Policy, x: torch.Tensor, key_tokens: int) -> dict:
    """One probe point's context figures (means over its rows)."""
    layout = parse(x, key_tokens)
    keep, ops = policy.decide(layout)
    n = layout.n_pairs.clamp(min=1).float()
    oracle = layout.valid & ~later_same_key(layout)
    kept_oracle = (keep & oracle).sum(1).float()
    return {"K": int(layout.query.sum(1).max()), "pairs": float(layout.n_pairs.float().mean()),
            "kept_share": float((keep.sum(1).float() / n).mean()),
            "kept_pairs": float(keep.sum(1).float().mean()),
            # the oracle's rule: exactly each key's last update kept
            "oracle_match": float((keep == oracle).all(1).float().mean()),
            "last_kept": float((kept_oracle / oracle.sum(1).clamp(min=1)).mean()),
            **{k: float(v.float().mean()) for k, v in ops.items()}}


def measured(analyse: Callable, wrapper: ContextManaged) -> Callable:
    """``analyse`` (the stream's kv_interference analysis) with the context figures of every
    probe point: ``out["context"]`` holds ``policy``, ``during``, ``by_updates`` (per U of the
    main curve: ``kept_share``, ``kept_pairs``, ``oracle_match`` (rows whose kept pairs are
    exactly each key's last update), ``last_kept`` (the share of last updates kept) and the
    operation counts per sequence), the same at the training points (``at_train``) and
    ``scorer_steps`` (learned)."""
    def run(predict):
        calls = []

        def counted(x):
            device = next(iter(wrapper.parameters())).device
            with torch.no_grad():
                calls.append(_stats(wrapper.policy, x.to(device), wrapper.key_tokens))
            return predict(x)

        out = analyse(counted)
        n_train, ups = len(out.get("train_points", [])), out.get("updates", [])
        fields = ("kept_share", "kept_pairs", "oracle_match", "last_kept") + OPS

        def table(rows):
            return {f: [r[f] for r in rows] for f in fields}

        out["context"] = {"policy": wrapper.policy.name, "during": wrapper.policy.during,
                          "at_train": table(calls[:n_train]),
                          "by_updates": table(calls[n_train:n_train + len(ups)]),
                          "ops": list(OPS),
                          "scorer_steps": getattr(wrapper.policy, "trained_steps", 0)}
        return out
    return run


def build_policy(node: dict, seed: int = 0, smoke: bool = False) -> Policy:
    """The policy of the config node; ``smoke``: its declared tiny sizes (``.smoke``, as the
    strategies', models' and streams' builders declare theirs)."""
    if not isinstance(node, dict) or "name" not in node:
        raise ConfigError(f"The context config needs a 'name' key (one of "
                          f"{', '.join(registry.names('context'))}); got {node!r}.")
    kwargs = dict(node)
    name = kwargs.pop("name")
    if name == "learned" and kwargs.get("seed") is None:
        kwargs["seed"] = seed
    if smoke:
        kwargs.update({k: v for k, v in getattr(registry.resolve("context", name), "smoke",
                                                  {}).items() if k in kwargs})
    policy = registry.build("context", name, **kwargs)
    if not isinstance(policy, Policy):
        raise ConfigError(f"context={name} built a {type(policy).__name__}, not a "
                          "cl_toolkit.context.Policy.")
    return policy


def attach(cfg: dict, stream, model: nn.Module) -> nn.Module:
    """``model`` behind the policy of ``cfg["context"]`` (None: ``model`` itself). Refuses a
    stream with no fragments to manage (its builder declares ``fragments``: only
    kv_interference does); wraps its kv_interference analysis with the context figures."""
    node = cfg.get("context")
    if node is None:
        return model
    name = node.get("name") if isinstance(node, dict) else node
    bench = (cfg.get("benchmark") or {}).get("name", stream.name)
    try:
        builder = registry.resolve("stream", bench)
    except ClToolkitError:  # an unknown stream is refused by build_stream, not here
        builder = None
    if getattr(builder, "fragments", None) != "key_value_pairs" or not stream.is_tokens:
        raise ConfigError(
            f"context={name} manages the (key, value) pairs of a context, but benchmark "
            f"{bench!r} has none to manage (images, market data and MQAR are not supported). "
            "Use benchmark=kv_interference, or drop the context (context=null).")
    policy = build_policy(node, int(cfg.get("seed", 0)), bool(cfg.get("smoke")))
    wrapper = ContextManaged(model, policy, stream.info["key_tokens"])
    if "kv_interference" in stream.analyses:
        stream.analyses["kv_interference"] = measured(stream.analyses["kv_interference"],
                                                      wrapper)
    return wrapper
