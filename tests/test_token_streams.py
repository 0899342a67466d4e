"""Token streams in the shared loop: the loss and the scores count answer positions only, the
runner records exact match, and language models refuse streams they cannot take."""
import math

import pytest
import torch
from torch import nn

from cl_toolkit import runner
from cl_toolkit.errors import ConfigError
from cl_toolkit import registry
from cl_toolkit.models.language import TokenModel, mom_lm
from cl_toolkit.strategy import RunContext, SupervisedStrategy, supervised_loss
from cl_toolkit.stream import IGNORE_INDEX, Task, TaskStream, TensorData

V = 6


def copy_stream(n=32, L=8, seed=0, analyses=None) -> TaskStream:
    """Targets: at every odd position, the token two places back (a tiny recall task)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (n, L), generator=g)
    y = torch.full_like(x, IGNORE_INDEX)
    y[:, 3::2] = x[:, 1:-2:2]
    data = TensorData(x, y)
    task = Task(0, "copy", data, TensorData(x.clone(), y.clone()), tuple(range(V)))
    return TaskStream("copy", [task], "domain-il", V, (L,), vocab_size=V,
                      analyses=analyses or {})


class Echo(nn.Module):
    """Logits [B, L, V] that predict the input token at every position."""
    uses_task_id = False

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t=None):
        return nn.functional.one_hot(x, V).float() * 10 + self.w


def test_loss_averages_over_answer_positions_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, V)
    y = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 5], [1, IGNORE_INDEX, IGNORE_INDEX,
                                                           IGNORE_INDEX]])
    terms = [-torch.log_softmax(logits[b, i], -1)[y[b, i]] for b, i in [(0, 1), (0, 3), (1, 0)]]
    assert math.isclose(float(supervised_loss(logits, y)), float(sum(terms) / 3), rel_tol=1e-6)


def test_scores_count_queries_and_exact_match():
    y = torch.full((3, 4), IGNORE_INDEX)
    y[0, 1], y[0, 3], y[1, 2], y[2, 0], y[2, 1] = 1, 2, 3, 4, 5
    pred = torch.zeros(3, 4, dtype=torch.long)
    pred[0, 1], pred[0, 3] = 1, 2          # sequence 0: both right
    pred[1, 2] = 0                          # sequence 1: its one answer wrong
    pred[2, 0], pred[2, 1] = 4, 0           # sequence 2: one of two right
    stream = TaskStream("t", [Task(0, "t", TensorData(pred.clone(), y), TensorData(
        pred.clone(), y), tuple(range(V)))], "domain-il", V, (4,), vocab_size=V)
    strategy = SupervisedStrategy()
    strategy.setup(stream, TokenModel(Echo(), V), RunContext())
    scores = runner.evaluate_scores(strategy, stream[0], 2, torch.device("cpu"))
    assert scores == {"accuracy": 3 / 5, "exact_match": 1 / 3}


def test_run_trains_a_language_model_and_records_exact_match(tmp_path, monkeypatch):
    calls = []

    def analysis(predict):
        x = copy_stream(n=4, seed=9)[0].test.x
        calls.append(predict(x).shape)
        return {"rows": int(x.shape[0])}

    stream = copy_stream(analyses={"probe": analysis})
    cfg = {"benchmark": {"name": "x"}, "model": {"name": "mom_lm", "hidden_size": 16,
                                                 "num_layers": 1, "chunk_size": 16, "backend": "torch"},
           "strategy": {"name": "naive", "epochs": 15, "batch_size": 16, "lr": 0.02,
                        "optimizer": "adam"}, "seed": 0}
    monkeypatch.setattr(runner, "build_stream", lambda c: stream)
    results = runner.run(cfg, tmp_path)
    em = results["extras"]["exact_match"]
    assert len(em["before"]) == 1 and len(em["matrix"]) == 1
    assert results["matrix"][0][0] > 0.8 > results["before"][0] + 0.5  # learned
    assert results["stream"]["vocab_size"] == V and results["stream"]["seq_len"] == 8
    assert results["extras"]["probe"] == {"after_task": 0, "rows": 4}
    assert calls == [torch.Size([4, 8])]


def test_token_data_checks():
    x = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="same shape"):
        TensorData(x, torch.zeros(2, 4, dtype=torch.long))
    bad = TensorData(x + V, torch.full((2, 3), IGNORE_INDEX))
    with pytest.raises(ValueError, match="vocabulary has 6 tokens"):
        TaskStream("t", [Task(0, "t", bad, bad, ())], "domain-il", V, (3,), vocab_size=V)
    bad_y = TensorData(x, torch.full((2, 3), 7))
    with pytest.raises(ValueError, match="targets must be token ids"):
        TaskStream("t", [Task(0, "t", bad_y, bad_y, ())], "domain-il", V, (3,), vocab_size=V)


def test_models_refuse_streams_they_cannot_take():
    stream = copy_stream()
    with pytest.raises(ConfigError, match="model.vocab_size=7 but benchmark 'copy' has "
                                          "vocab_size=6"):
        mom_lm(stream, vocab_size=7, hidden_size=8, num_layers=1)
    with pytest.raises(ConfigError, match="Unknown config key model.topk"):
        registry.build("model", "gdn_lm", stream, topk=2)
    with pytest.raises(ConfigError, match="task_routing=true needs task ids at test time"):
        mom_lm(stream, task_routing=True)
    with pytest.raises(ConfigError, match="token stream, which model=mlp cannot take"):
        runner.build_model({"model": {"name": "mlp"}}, stream)
    labels = torch.zeros(2, dtype=torch.long)
    images = TaskStream("img", [Task(0, "a", TensorData(torch.zeros(2, 1, 4, 4), labels),
                                     TensorData(torch.zeros(2, 1, 4, 4), labels), (0,))],
                        "domain-il", 2, (1, 4, 4))
    with pytest.raises(ConfigError, match="A language model needs a token stream"):
        mom_lm(images, hidden_size=8, num_layers=1)


def test_presets_have_equal_parameters():
    """conf/model/*_lm.yaml: the four memory types at equal parameters (within 0.5 %)."""
    from pathlib import Path

    import yaml

    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    stream = copy_stream()
    counts = {}
    for name in ("mom_lm", "gdn_lm", "gla_lm", "transformer_lm"):
        node = yaml.safe_load((conf / f"{name}.yaml").read_text())
        model = registry.build("model", node.pop("name"), stream, **node)
        counts[name] = sum(p.numel() for p in model.parameters())
    assert max(counts.values()) / min(counts.values()) < 1.005, counts


@pytest.mark.parametrize("name", ["mom_lm", "gdn_lm", "gla_lm", "transformer_lm"])
def test_language_models_are_causal(name):
    """Changing the tokens after position 4 leaves the logits up to position 4 unchanged."""
    torch.manual_seed(0)
    model = registry.build("model", name, copy_stream(), hidden_size=16, num_layers=1)
    x = torch.randint(0, V, (2, 8))
    x2 = x.clone()
    x2[:, 5:] = (x2[:, 5:] + 1) % V
    a, b = model(x), model(x2)
    assert a.shape == (2, 8, V)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-5)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)


def two_task_copy_stream(sizes=(8, 40), L=8) -> TaskStream:
    tasks = []
    for i, n in enumerate(sizes):
        s = copy_stream(n=n, L=L, seed=i)
        tasks.append(Task(i, f"copy{i}", s[0].train, s[0].test, tuple(range(V))))
    return TaskStream("copy2", tasks, "domain-il", V, (L,), vocab_size=V)


def test_replay_on_a_token_stream_shares_its_budget_over_tasks_and_replays_targets():
    from cl_toolkit.strategies.replay import Replay

    stream = two_task_copy_stream()
    strategy = Replay(buffer_size=12, epochs=1, batch_size=8, lr=0.1)
    strategy.setup(stream, TokenModel(Echo(), V), RunContext())
    for task in stream:
        strategy.learn(task)
    buf = strategy.buffer.data
    # Tasks of 8 and 40 sequences: an equal share each, not one in proportion to their sizes.
    assert buf.y.shape == (12, 8) and torch.bincount(buf.t).tolist() == [6, 6]
    # Every kept sequence is one of its task's, whole: x and its targets together.
    for x, y, t in zip(buf.x, buf.y, buf.t):
        train = stream[int(t)].train
        hit = ((train.x == x).all(1) & (train.y == y).all(1)).any()
        assert hit
    # The loss of a step covers the replayed sequences' answer positions too (oracle:
    # cross-entropy over the concatenated batch with the ignored positions left out).
    strategy.ctx.generator.manual_seed(3)
    x, y, t = stream[1].train.x[:4], stream[1].train.y[:4], stream[1].train.t[:4]
    loss = strategy.loss(x, y, t, stream[1])
    strategy.ctx.generator.manual_seed(3)
    mem = strategy.buffer.sample(4, strategy.ctx.generator)
    xx, yy = torch.cat([x, mem.x]), torch.cat([y, mem.y])
    logits = strategy.model(xx)
    keep = yy != IGNORE_INDEX
    ref = nn.functional.cross_entropy(logits[keep], yy[keep])
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-6)
