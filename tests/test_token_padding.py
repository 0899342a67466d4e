"""Token tasks of different lengths train together (issue 22, item 1): replay and joint pad to a
common length with the ignore index, which changes neither a causal model's outputs at the real
positions nor the loss over them."""
import torch
import torch.nn.functional as F
from torch import nn

from cl_toolkit.runner import run
from cl_toolkit.strategies.joint import Joint
from cl_toolkit.strategies.replay import Replay
from cl_toolkit.strategy import RunContext
from cl_toolkit.stream import IGNORE_INDEX, Task, TaskStream, TensorData, pad_tokens


class PerPosition(nn.Module):
    """Logits of each position from its own token only: causal by construction."""

    def __init__(self, vocab=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)

    def forward(self, x, t=None):
        return self.emb(x)


def token_task(i, n, L, g):
    x = torch.randint(1, 8, (n, L), generator=g)
    y = torch.full_like(x, IGNORE_INDEX)
    y[:, -1] = x[:, 0]  # the answer: the first token, asked at the last position
    return Task(i, f"L{L}", TensorData(x, y), TensorData(x.clone(), y.clone()), ())


def test_pad_tokens_pads_inputs_with_zero_and_targets_with_ignore():
    xs, ys = pad_tokens([torch.ones(2, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)],
                        [torch.ones(2, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)])
    assert [x.shape[1] for x in xs] == [5, 5]
    assert xs[0][:, 3:].eq(0).all() and ys[0][:, 3:].eq(IGNORE_INDEX).all()
    assert xs[1].eq(1).all() and ys[1].eq(1).all()


def test_replay_loss_over_mixed_lengths_equals_the_loss_over_real_answers():
    g = torch.Generator().manual_seed(0)
    stream = TaskStream("mixed", [token_task(0, 6, 4, g), token_task(1, 6, 7, g)], "task-il",
                        8, (7,), vocab_size=8)
    torch.manual_seed(0)
    strategy = Replay(buffer_size=4, replay_batch_size=3, epochs=1, batch_size=3)
    strategy.setup(stream, PerPosition(), RunContext(generator=torch.Generator().manual_seed(1)))
    strategy.learn(stream[0])
    strategy.learn(stream[1])  # crashed before: sizes 7 and 4 cannot be concatenated
    x, y, t = stream[1].train.x[:3], stream[1].train.y[:3], stream[1].train.t[:3]
    state = strategy.ctx.generator.get_state()
    loss = strategy.loss(x, y, t, stream[1])
    strategy.ctx.generator.set_state(state)
    mem = strategy.buffer.sample(3, strategy.ctx.generator)
    # oracle: cross-entropy at the real answer positions only, each sequence cut to its task's
    # own length (4 or 7 tokens, answer last)
    lengths = [(4, 7)[int(ti)] for ti in mem.t]
    logits = [strategy.model(x)[:, -1]] + [strategy.model(m[None, :n])[:, -1]
                                          for m, n in zip(mem.x, lengths)]
    answers = [y[:, -1]] + [m[n - 1:n] for m, n in zip(mem.y, lengths)]
    assert sorted(set(lengths)) == [4, 7]  # the replayed batch mixes both lengths
    want = F.cross_entropy(torch.cat(logits), torch.cat(answers))
    assert torch.allclose(loss, want)


def test_joint_trains_on_the_union_of_tasks_of_different_lengths():
    g = torch.Generator().manual_seed(0)
    stream = TaskStream("mixed", [token_task(0, 6, 4, g), token_task(1, 6, 7, g)], "task-il",
                        8, (7,), vocab_size=8)
    strategy = Joint(epochs=1, batch_size=4)
    strategy.setup(stream, PerPosition(), RunContext())
    strategy.learn(stream[0])
    data = strategy.train_data(stream[1])
    assert data.x.shape == (12, 7) and (data.y != IGNORE_INDEX).sum() == 12
    strategy.learn(stream[1])


def test_replay_runs_on_kv_interference_split_by_updates(tmp_path):
    """The README repro of the crash: tasks whose sequences differ in length."""
    res = run({"seed": 0, "threads": 1, "smoke": True,
               "benchmark": {"name": "kv_interference", "split": "updates"},
               "model": {"name": "gdn_lm"}, "strategy": {"name": "replay"}}, tmp_path)
    assert res["status"] == "done" and len(res["matrix"]) == 2
