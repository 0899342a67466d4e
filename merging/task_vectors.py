"""Task vectors: parameter-by-parameter arithmetic on state dicts.

A task vector is ``tau = theta_ft - theta_0`` for every floating-point entry of a state dict
(Ilharco et al., https://arxiv.org/abs/2212.04089). Integer entries (BatchNorm's
``num_batches_tracked``) are bookkeeping, not weights, and are left out.

Everything here works one tensor at a time and on whatever device the tensors live on, so a
merge never needs more than the model-sized buffers its method really keeps; functions ending
in ``_`` write into their first argument instead of allocating a new state dict.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

import torch

from cl_toolkit.errors import ClToolkitError, ConfigError

StateDict = Mapping[str, torch.Tensor]


class StateDictMismatchError(ConfigError):
    """Two state dicts that should describe the same architecture do not."""


class CheckpointNotFoundError(ClToolkitError, FileNotFoundError):
    """A checkpoint path named in the config does not exist."""


class NonFiniteTaskVectorError(ClToolkitError, FloatingPointError):
    """A task vector holds NaN or Inf, which would poison every merged model after it."""


def floating_keys(state: StateDict, prefixes: Iterable[str] | None = None) -> list[str]:
    """Keys of the floating-point entries, optionally only those starting with a prefix."""
    prefixes = None if prefixes is None else tuple(prefixes)
    return [k for k, v in state.items() if v.is_floating_point()
            and (prefixes is None or k.startswith(prefixes))]


def check_compatible(reference: StateDict, other: StateDict, keys: Iterable[str],
                     what: str = "checkpoint") -> None:
    """Raise `StateDictMismatchError` naming the first key that is missing or differs in shape
    or dtype; ``reference`` is the base model, ``other`` the one being merged into it."""
    keys = list(keys)
    missing = [k for k in keys if k not in other]
    if missing:
        raise StateDictMismatchError(
            f"The {what} lacks {len(missing)} of the base model's {len(keys)} merged entries, "
            f"first {missing[0]!r} (base shape {tuple(reference[missing[0]].shape)}). It was "
            "probably saved from a different architecture; fine-tune it from the same base "
            "model or drop it from `checkpoints`."
        )
    for k in keys:
        a, b = reference[k], other[k]
        if a.shape != b.shape:
            raise StateDictMismatchError(
                f"Entry {k!r} has shape {tuple(b.shape)} in the {what} but "
                f"{tuple(a.shape)} in the base model: the two are different architectures. "
                "Use a checkpoint fine-tuned from this base model."
            )
        if a.dtype != b.dtype:
            raise StateDictMismatchError(
                f"Entry {k!r} is {b.dtype} in the {what} but {a.dtype} in the base model "
                f"(shape {tuple(a.shape)}). Convert the checkpoint to {a.dtype} before merging."
            )


def check_finite(tv: StateDict, what: str = "task vector") -> None:
    """Raise `NonFiniteTaskVectorError` naming the first entry with NaN or Inf."""
    for k, v in tv.items():
        if not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise NonFiniteTaskVectorError(
                f"The {what} has {bad} NaN/Inf values in {k!r} (shape {tuple(v.shape)}). The "
                "fine-tuning that produced it diverged: lower its learning rate or check its "
                "inputs; merging it would make every later model NaN."
            )


def task_vector(finetuned: StateDict, base: StateDict, keys: Iterable[str] | None = None,
                what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """``finetuned - base`` for ``keys`` (default: every floating entry of ``base``)."""
    keys = floating_keys(base) if keys is None else list(keys)
    check_compatible(base, finetuned, keys, what)
    return {k: finetuned[k].to(base[k].device) - base[k] for k in keys}


def subtract_(target: dict[str, torch.Tensor], base: StateDict) -> dict[str, torch.Tensor]:
    """``target -= base`` entry by entry, in place: turns a fine-tuned model's own tensors into
    its task vector without a second model-sized buffer."""
    for k, v in target.items():
        v.sub_(base[k])
    return target


def add_(target: dict[str, torch.Tensor], tv: StateDict, scale: float = 1.0
         ) -> dict[str, torch.Tensor]:
    """``target += scale * tv`` entry by entry, in place."""
    for k, v in target.items():
        v.add_(tv[k], alpha=scale)
    return target


def combine_into_(out: dict[str, torch.Tensor], base: StateDict, tv: StateDict,
                  scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``out = base + scale * tv`` entry by entry, written into ``out``'s existing tensors
    (e.g. a model's parameters)."""
    for k, v in out.items():
        v.copy_(base[k]).add_(tv[k], alpha=scale)
    return out


def assign_(target: dict[str, torch.Tensor], source: StateDict) -> dict[str, torch.Tensor]:
    """``target = source`` entry by entry, into ``target``'s existing tensors."""
    for k, v in target.items():
        v.copy_(source[k])
    return target


def zeros_like(state: StateDict) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def clone(state: StateDict) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def norm(tv: StateDict) -> float:
    """Whole-model L2 norm (square root of the sum over entries), accumulated in float64."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(v, dtype=torch.float64)) ** 2
                         for v in tv.values()))


def dot(a: StateDict, b: StateDict) -> float:
    """Whole-model Frobenius inner product, accumulated in float64."""
    return sum(float((a[k].double() * b[k].double()).sum()) for k in a)


def nbytes(state: StateDict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> dict[str, torch.Tensor]:
    """A state dict from ``path``: a plain ``torch.save``-d state dict, or a dict holding one
    under ``"state_dict"`` or ``"model"`` (what most training scripts save)."""
    path = Path(path).expanduser()
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*"))[:10] if path.parent.is_dir() else []
        hint = (f" Files in {str(path.parent)!r}: {', '.join(near)}." if near
                else f" The folder {str(path.parent)!r} does not exist either.")
        raise CheckpointNotFoundError(
            f"Checkpoint {str(path)!r} does not exist.{hint} Fix the path in `checkpoints`, or "
            "remove the entry to fine-tune that task within the run."
        )
    state = torch.load(path, map_location=map_location, weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ConfigError(
            f"Checkpoint {str(path)!r} does not hold a state dict (got {type(state).__name__}). "
            "Save it with torch.save(model.state_dict(), path)."
        )
    return state
