"""Task streams: the one abstraction every method consumes.

A `TaskStream` is an ordered list of `Task`s plus the scenario that says what the learner is told
at test time:

- ``task-il``: the task id is given (multi-head or masked single head);
- ``class-il``: it is not, and every class seen so far competes;
- ``domain-il``: every task has the same label space, the input distribution shifts.

Datasets are held as in-memory tensors (`TensorData`) because every stream we ship fits in RAM
and indexing a tensor is the fastest data path on a CPU: no DataLoader, no per-sample Python.

Token streams (language-model tasks such as associative recall) use the same containers: ``x``
and ``y`` are token ids ``[N, L]`` (int64), ``y`` holds the target of every position, and
``IGNORE_INDEX`` (-100, PyTorch's cross-entropy default) marks positions without a loss. The
stream then carries its ``vocab_size`` and may carry ``analyses``: functions that score a model
on extra held-out sets (accuracy against the number of pairs, error classes, ...) and whose
JSON goes into ``results["extras"]``.

Every stream names the kind of its tasks (``kind``, see `cl_toolkit.task_kinds`): the shape of
their data, the loss and the score. Left unset it is ``tokens`` for a stream with a vocabulary
and ``classification`` otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .config import SCENARIOS
from .task_kinds import IGNORE_INDEX, task_kind

# predict(x [N, L]) -> predicted token ids [N, L] (the argmax of the next-token logits)
TokenPredictor = Callable[[torch.Tensor], torch.Tensor]
Analysis = Callable[[TokenPredictor], dict]


@dataclass
class TensorData:
    """Inputs ``x`` ``[N, ...]``, targets ``y`` ``[N, ...]`` (global integer labels ``[N]`` for
    classification; see `cl_toolkit.task_kinds` for the other kinds) and the task id of every
    sample ``t`` ``[N]`` (replay buffers and joint training mix tasks in one batch, and
    multi-head models need to know which head each sample belongs to)."""

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor | None = None

    def __post_init__(self):
        n = self.x.shape[0]
        if self.y.shape[0] != n or (self.t is not None and self.t.shape[0] != n):
            raise ValueError(
                f"TensorData has {n} inputs, {self.y.shape[0]} labels and "
                f"{None if self.t is None else self.t.shape[0]} task ids; all must have the "
                "same first dimension."
            )
        if self.y.dtype != torch.long and not self.y.is_floating_point():
            self.y = self.y.long()
        if self.t is None:
            self.t = torch.zeros(n, dtype=torch.long)
        if self.x.dtype == torch.long and self.y.dim() == 2 and self.x.shape != self.y.shape:
            raise ValueError(f"Token data needs x and y of the same shape [N, L]; got x "
                             f"{tuple(self.x.shape)} and y {tuple(self.y.shape)}.")

    @property
    def is_tokens(self) -> bool:
        """Token ids ``x`` with per-position targets ``y [N, L]``."""
        return self.x.dtype == torch.long and self.y.dim() == 2

    @property
    def has_labels(self) -> bool:
        """One integer class label per sample (what class-balanced buffers balance over)."""
        return self.y.dim() == 1 and not self.y.is_floating_point()

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: torch.Tensor) -> "TensorData":
        return TensorData(self.x[index], self.y[index], self.t[index])

    @staticmethod
    def cat(parts: Sequence["TensorData"]) -> "TensorData":
        """The samples of ``parts`` in order; token data of different lengths are padded on the
        right to the longest (see `pad_tokens`)."""
        if all(p.is_tokens for p in parts):
            xs, ys = pad_tokens([p.x for p in parts], [p.y for p in parts])
            return TensorData(torch.cat(xs), torch.cat(ys), torch.cat([p.t for p in parts]))
        return TensorData(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]),
                          torch.cat([p.t for p in parts]))

    def batches(self, batch_size: int, generator: torch.Generator | None = None,
                shuffle: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Mini-batches ``(x, y, t)`` by tensor indexing; one randperm per epoch if shuffling."""
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=generator)
            for s in range(0, n, batch_size):
                idx = order[s:s + batch_size]
                yield self.x[idx], self.y[idx], self.t[idx]
        else:
            for s in range(0, n, batch_size):
                yield self.x[s:s + batch_size], self.y[s:s + batch_size], self.t[s:s + batch_size]


@dataclass
class Task:
    """One step of a stream.

    ``classes`` are the global class ids present in the task; ``class_names`` has one name per
    global class id of the whole stream (CLIP heads are built from them).
    """

    index: int
    name: str
    train: TensorData
    test: TensorData
    classes: tuple[int, ...]
    class_names: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)


@dataclass
class TaskStream:
    """Ordered tasks plus the scenario. ``num_classes`` is the size of the global label space
    (the vocabulary for token streams, where ``vocab_size`` is set and ``input_shape`` is
    ``(L,)``, the longest sequence)."""

    name: str
    tasks: list[Task]
    scenario: str
    num_classes: int
    input_shape: tuple[int, ...]
    seed: int = 0
    info: dict = field(default_factory=dict)
    vocab_size: int | None = None
    analyses: dict[str, Analysis] = field(default_factory=dict)
    kind: str | None = None
    token_text: tuple[str, ...] | None = None  # text of each token id (models/hf_lm.py)

    def __post_init__(self):
        if self.kind is None:
            self.kind = "tokens" if self.vocab_size is not None else "classification"
        if self.scenario not in SCENARIOS:
            raise ValueError(
                f"Unknown scenario {self.scenario!r}; choose one of {', '.join(SCENARIOS)}."
            )
        if not self.tasks:
            raise ValueError(f"Stream {self.name!r} has no tasks.")
        for i, t in enumerate(self.tasks):
            if t.index != i:
                raise ValueError(f"Task {t.name!r} has index {t.index} but sits at position {i}.")
            t.train.t = torch.full((len(t.train),), i, dtype=torch.long)
            t.test.t = torch.full((len(t.test),), i, dtype=torch.long)
        kind = task_kind(self.kind)
        for t in self.tasks:
            kind.check(t.train, f"{self.name} task {t.name!r} train")
            kind.check(t.test, f"{self.name} task {t.name!r} test")
        if self.vocab_size is not None:
            for t in self.tasks:
                check_tokens(t.train, self.vocab_size, f"{self.name} task {t.name!r} train")
                check_tokens(t.test, self.vocab_size, f"{self.name} task {t.name!r} test")

    @property
    def is_tokens(self) -> bool:
        return self.vocab_size is not None

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    @property
    def task_il(self) -> bool:
        return self.scenario == "task-il"

    def shuffled(self, seed: int) -> "TaskStream":
        """The same tasks in a seeded random order (papers report mean ± std over orders);
        class ids are unchanged, task indices follow the new order."""
        from dataclasses import replace

        order = torch.randperm(len(self.tasks), generator=torch.Generator().manual_seed(seed))
        tasks = [replace(self.tasks[i], index=new, train=replace(self.tasks[i].train),
                         test=replace(self.tasks[i].test))
                 for new, i in enumerate(order.tolist())]
        return replace(self, tasks=tasks,
                       info={**self.info, "task_order": [self.tasks[i].name for i in order]})

    def describe(self) -> dict:
        """JSON-friendly description stored with every result."""
        return {
            "name": self.name,
            "kind": self.kind,
            "scenario": self.scenario,
            "num_tasks": len(self.tasks),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "seed": self.seed,
            "tasks": [
                {"name": t.name, "classes": list(t.classes), "train": len(t.train),
                 "test": len(t.test)}
                for t in self.tasks
            ],
            **({"info": self.info} if self.info else {}),
            **({"vocab_size": self.vocab_size, "seq_len": int(self.input_shape[0])}
               if self.is_tokens else {}),
        }


def pad_tokens(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Token ids ``[N_i, L_i]`` and their targets padded on the right to the longest ``L``:
    inputs with token 0, targets with ``IGNORE_INDEX``. A causal model's outputs at the real
    positions do not see the padding, and the padding carries no loss, so sequences of several
    lengths train together (replay and joint training over tasks of different lengths)."""
    L = max(x.shape[1] for x in xs)
    pad = torch.nn.functional.pad
    return ([x if x.shape[1] == L else pad(x, (0, L - x.shape[1])) for x in xs],
            [y if y.shape[1] == L else pad(y, (0, L - y.shape[1]), value=IGNORE_INDEX)
             for y in ys])


def check_tokens(data: TensorData, vocab_size: int, where: str) -> None:
    """Token ids in ``[0, vocab_size)`` and targets that are token ids or ``IGNORE_INDEX``
    (checked once when the stream is built, never on the training path)."""
    if not data.is_tokens or data.x.dtype != torch.long:
        raise ValueError(f"{where}: token streams need x and y as int64 [N, L]; got x "
                         f"{data.x.dtype} {tuple(data.x.shape)}, y {tuple(data.y.shape)}.")
    if len(data) == 0:
        return
    if int(data.x.min()) < 0 or int(data.x.max()) >= vocab_size:
        raise ValueError(f"{where}: token ids span [{int(data.x.min())}, {int(data.x.max())}] "
                         f"but the vocabulary has {vocab_size} tokens.")
    bad = (data.y != IGNORE_INDEX) & ((data.y < 0) | (data.y >= vocab_size))
    if bool(bad.any()):
        raise ValueError(f"{where}: targets must be token ids in [0, {vocab_size}) or "
                         f"{IGNORE_INDEX} (no loss); found {int(data.y[bad][0])}.")
