"""Experience replay with a class-balanced buffer of at most ``buffer_size`` samples.

Each training step adds a batch drawn from the buffer to the current batch. After a task the
buffer is rebuilt so every class seen so far gets an equal share of the budget; within a class
the kept samples are a uniform random subset (reservoir sampling, done in one draw since the
whole task is in memory). Where samples have no single class label (token sequences, a day's
cross-section, a segmentation mask) the budget is shared over the tasks seen so far instead.
Token sequences of different lengths are padded to a common one (`pad_tokens`).
"""
from __future__ import annotations

import torch

from cl_toolkit.stream import Task, TensorData, pad_tokens
from cl_toolkit.strategy import SupervisedStrategy, tensor_bytes
from cl_toolkit.validation import at_least


class ClassBalancedBuffer:
    """A fixed budget in samples, split evenly over classes (the remainder goes to the first
    classes in id order); over tasks for data whose samples have no single class."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"buffer_size must be >= 0; got {size}.")
        self.size = size
        self.data: TensorData | None = None

    def __len__(self) -> int:
        return 0 if self.data is None else len(self.data)

    def update(self, new: TensorData, generator: torch.Generator) -> None:
        pool = new if self.data is None else TensorData.cat([self.data, new])
        labels = pool.y if pool.has_labels else pool.t  # what the budget is balanced over
        groups = labels.unique(sorted=True)
        quota = [self.size // len(groups) + (i < self.size % len(groups))
                 for i in range(len(groups))]
        keep = []
        for c, q in zip(groups.tolist(), quota):
            idx = (labels == c).nonzero().squeeze(1)
            keep.append(idx[torch.randperm(len(idx), generator=generator)[:q]])
        self.data = pool.subset(torch.cat(keep))

    def sample(self, n: int, generator: torch.Generator) -> TensorData:
        idx = torch.randint(len(self.data), (n,), generator=generator)
        return self.data.subset(idx)

    def nbytes(self) -> int:
        return 0 if self.data is None else tensor_bytes(self.data.x, self.data.y, self.data.t)


class Replay(SupervisedStrategy):
    name = "replay"
    ranges = {"buffer_size": at_least(0), "replay_batch_size": at_least(1)}
    smoke = {"buffer_size": 8}

    def __init__(self, buffer_size: int = 200, replay_batch_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.buffer = ClassBalancedBuffer(buffer_size)
        self.replay_batch_size = replay_batch_size

    def loss(self, x, y, t, task: Task) -> torch.Tensor:
        if len(self.buffer):
            mem = self.buffer.sample(self.replay_batch_size or x.shape[0], self.ctx.generator)
            dev = x.device
            xs, ys = [x, mem.x.to(dev)], [y, mem.y.to(dev)]
            if mem.is_tokens:
                xs, ys = pad_tokens(xs, ys)
            x, y, t = torch.cat(xs), torch.cat(ys), torch.cat([t, mem.t.to(dev)])
        return self.kind.loss(self.model(x, self.train_task_ids(t)), y)

    def after_task(self, task: Task) -> None:
        self.buffer.update(task.train, self.ctx.generator)

    def memory_bytes(self) -> int:
        return self.buffer.nbytes()

    def state_dict(self) -> dict:
        state = super().state_dict()
        b = self.buffer.data
        state["buffer"] = None if b is None else {"x": b.x, "y": b.y, "t": b.t}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        b = state["buffer"]
        self.buffer.data = None if b is None else TensorData(b["x"], b["y"], b["t"])
