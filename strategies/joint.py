"""Joint training, the upper bound: after task k the model has been trained on the union of
tasks 0..k (all their training data, not a buffer)."""
from __future__ import annotations

from cl_toolkit.stream import Task, TensorData
from cl_toolkit.strategy import SupervisedStrategy, tensor_bytes


class Joint(SupervisedStrategy):
    """With ``reset=True`` every step starts from the initial weights (the classical "trained
    once on everything seen so far"); otherwise it keeps training the same model."""

    name = "joint"

    def __init__(self, reset: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.reset = reset

    def setup(self, stream, model, ctx):
        super().setup(stream, model, ctx)
        self._initial = {k: v.clone() for k, v in self.model.state_dict().items()}

    def train_data(self, task: Task) -> TensorData:
        if self.reset:
            self.model.load_state_dict(self._initial)
        return TensorData.cat([t.train for t in self.stream.tasks[: task.index + 1]])

    def memory_bytes(self) -> int:
        """Joint training keeps every training sample seen so far."""
        return sum(tensor_bytes(t.train.x, t.train.y, t.train.t)
                   for t in self.stream.tasks[: self.tasks_seen])
