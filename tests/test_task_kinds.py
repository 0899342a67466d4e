"""Task kinds: each score against an independent oracle (numpy / scipy, hand counts), the
runner's matrix and report metric per kind, and a plugin kind from the registry."""
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from cl_toolkit import registry, runner
from cl_toolkit.strategies.naive import Naive
from cl_toolkit.strategy import RunContext
from cl_toolkit.stream import Task, TaskStream, TensorData
from cl_toolkit.task_kinds import (Classification, CrossSection, Segmentation, TaskKind,
                                   daily_ic, dice_iou, rank_normalise, task_kind)


def test_daily_ic_matches_numpy_and_scipy_with_missing_entities():
    g = torch.Generator().manual_seed(0)
    pred, y = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    y[1, :4] = float("nan")      # entities absent on day 1
    y[3, 1:] = float("nan")      # one entity on day 3: IC undefined, day left out
    pearson, spearman = [], []
    for d in range(6):
        ok = ~np.isnan(y[d].numpy())
        if ok.sum() < 2:
            continue
        pearson.append(np.corrcoef(pred[d].numpy()[ok], y[d].numpy()[ok])[0, 1])
        spearman.append(stats.spearmanr(pred[d].numpy()[ok], y[d].numpy()[ok])[0])
    assert np.allclose(daily_ic(pred, y), pearson, atol=1e-6)
    assert np.allclose(daily_ic(pred, y, rank=True), spearman, atol=1e-6)


def test_rank_normalise_spans_minus_one_to_one_with_ties_averaged():
    y = torch.tensor([[3.0, 1.0, 2.0, float("nan")], [5.0, 5.0, 1.0, 7.0]])
    out = rank_normalise(y)
    assert out[0, :3].tolist() == [1.0, -1.0, 0.0] and math.isnan(out[0, 3])
    # ranks 2.5, 2.5, 1, 4 of 4 -> 2 * (r - 1) / 3 - 1
    assert torch.allclose(out[1], torch.tensor([0.0, 0.0, -1.0, 1.0]))


def test_dice_and_iou_by_hand():
    y = torch.tensor([[[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, -100]]])
    pred = torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 2], [0, 1, 0, 2]]])
    dice, iou = dice_iou(pred, y, 3)
    # class 1: truth 4 px, prediction 4 px (one outside the truth), overlap 3
    assert dice[0] == [pytest.approx(6 / 8)] and iou[0] == [pytest.approx(3 / 5)]
    # class 2: truth 3 px; the prediction's pixel (3, 3) is unlabelled in the truth, so it
    # counts for neither: prediction 1 px, overlap 1
    assert dice[1] == [pytest.approx(2 / 4)] and iou[1] == [pytest.approx(1 / 3)]


def test_dice_skips_a_class_absent_from_both():
    y = torch.zeros(1, 3, 3, dtype=torch.long)
    dice, _ = dice_iou(torch.zeros_like(y), y, 2)
    assert len(dice) == 1 and math.isnan(dice[0][0])


class Linear(nn.Module):
    """[D, S, F] -> [D, S]"""

    def __init__(self, f):
        super().__init__()
        self.lin = nn.Linear(f, 1)

    def forward(self, x, t=None):
        return self.lin(x).squeeze(-1)


def market_stream():
    """Two periods of a factor market: the return is feature 0 (period 0) or feature 1 (period 1)
    plus noise, so a model that learns period 1 loses period 0's IC."""
    g = torch.Generator().manual_seed(0)
    tasks = []
    for i in range(2):
        x = torch.randn(40, 12, 3, generator=g)
        y = x[..., i] + 0.1 * torch.randn(40, 12, generator=g)
        tasks.append(Task(i, f"period{i}", TensorData(x[:30], y[:30]), TensorData(x[30:], y[30:]),
                          classes=()))
    return TaskStream("market", tasks, "domain-il", 0, (12, 3), kind="cross_section")


def test_cross_section_kind_trains_and_scores_by_ic():
    torch.manual_seed(0)
    stream = market_stream()
    strategy = Naive(epochs=30, batch_size=5, lr=0.1)
    strategy.setup(stream, Linear(3), RunContext())
    strategy.learn(stream[0])
    s0 = runner.evaluate_scores(strategy, stream[0], 4, torch.device("cpu"))
    assert list(s0) == ["ic", "rank_ic", "icir", "rank_icir", "precision_at_k"]
    assert s0["ic"] > 0.9  # learned period 0
    # independent oracle: the mean of per-day numpy correlations of the model's predictions
    with torch.no_grad():
        pred = strategy.model(stream[0].test.x)
    want = np.mean([np.corrcoef(pred[d], stream[0].test.y[d])[0, 1] for d in range(10)])
    assert s0["ic"] == pytest.approx(want, abs=1e-6)
    strategy.learn(stream[1])
    after = runner.evaluate_scores(strategy, stream[0], 4, torch.device("cpu"))
    assert after["ic"] < s0["ic"] - 0.3  # forgetting, measured in IC


class PixelNet(nn.Module):
    """[N, 1, H, W] -> [N, 2, H, W] logits per pixel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x, t=None):
        return self.conv(x)


def blob_stream():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 1, 8, 8, generator=g)
    y = (x[:, 0] > 0.5).long()  # foreground = bright pixels
    task = Task(0, "blobs", TensorData(x[:16], y[:16]), TensorData(x[16:], y[16:]), classes=())
    return TaskStream("blobs", [task], "domain-il", 2, (1, 8, 8), kind="segmentation")


def test_segmentation_kind_trains_and_scores_by_dice():
    torch.manual_seed(0)
    stream = blob_stream()
    strategy = Naive(epochs=60, batch_size=8, lr=0.5)
    strategy.setup(stream, PixelNet(), RunContext())
    before = runner.evaluate_scores(strategy, stream[0], 4, torch.device("cpu"))
    strategy.learn(stream[0])
    after = runner.evaluate_scores(strategy, stream[0], 4, torch.device("cpu"))
    assert list(after) == ["dice", "iou", "hd95", "temporal_error", "fps"]
    assert after["dice"] > 0.9 > before["dice"]
    with torch.no_grad():
        pred = strategy.model(stream[0].test.x).argmax(1)
    truth = stream[0].test.y
    per_image = [2 * ((p == 1) & (t == 1)).sum() / ((p == 1).sum() + (t == 1).sum())
                 for p, t in zip(pred, truth)]
    assert after["dice"] == pytest.approx(float(torch.stack(per_image).mean()), abs=1e-6)


def test_kind_checks_the_data_shape():
    x = torch.randn(4, 5, 3)
    with pytest.raises(ValueError, match="cross-section task needs"):
        CrossSection().check(TensorData(x, torch.zeros(4, 7)), "here")
    with pytest.raises(ValueError, match="segmentation task needs"):
        Segmentation().check(TensorData(torch.randn(4, 1, 8, 8), torch.zeros(4, 8, 7).long()),
                             "here")
    with pytest.raises(ValueError, match="classification task needs"):
        Classification().check(TensorData(x, torch.zeros(4, 5).long()), "here")
    with pytest.raises(ValueError, match="market task 'period0' train"):
        TaskStream("market", [Task(0, "period0", TensorData(x, torch.zeros(4, 7)),
                                   TensorData(x, torch.zeros(4, 5)), ())], "domain-il", 0, (5, 3),
                   kind="cross_section")


def test_results_name_the_metric_and_report_lower_is_better(tmp_path, monkeypatch):
    class Error(TaskKind):
        """A plugin kind: the error rate, lower is better."""
        name = "error_rate"
        metric = __import__("cl_toolkit.task_kinds", fromlist=["Metric"]).Metric(
            "error", "error rate", higher_is_better=False)

        def loss(self, output, y):
            return nn.functional.cross_entropy(output, y)

        def score(self, predict, data, batch_size):
            return {"error": 1 - Classification().score(predict, data, batch_size)["accuracy"]}

    monkeypatch.setitem(registry.BUILTINS["task_kind"], "error_rate", f"{__name__}:_ERROR")
    globals()["_ERROR"] = Error
    assert isinstance(task_kind("error_rate"), Error)
    from cl_toolkit.benchmarks.digits import split_digits

    def digits_errors(**kw):
        s = split_digits(**kw)
        s.kind = "error_rate"
        return s

    monkeypatch.setitem(registry.BUILTINS["stream"], "digits_err", f"{__name__}:_DIGITS")
    globals()["_DIGITS"] = digits_errors
    Naive.task_kinds = Naive.task_kinds + ("error_rate",)
    try:
        res = runner.run({"seed": 0, "threads": 1, "benchmark": {"name": "digits_err", "scenario": "class-il"},
                          "model": {"name": "mlp"}, "strategy": {"name": "naive", "epochs": 1}},
                         tmp_path)
    finally:
        Naive.task_kinds = Naive.task_kinds[:-1]
    assert res["metric"]["key"] == "error" and res["metric"]["higher_is_better"] is False
    R = np.array(res["matrix"])
    assert res["metrics"]["acc"] == pytest.approx(R[-1].mean())
    # forgetting of an error: how much it rose from its best (lowest) value
    T = len(R)
    want = np.mean([R[-1, j] - R[j:T - 1, j].min() for j in range(T - 1)])
    assert res["metrics"]["forgetting"] == pytest.approx(want)
    assert res["metrics"]["forgetting"] > 0


def test_cross_section_loss_is_mse_to_the_days_ranks_over_present_entities():
    y = torch.tensor([[30.0, 10.0, 20.0, float("nan")]])  # ranks -> [1, -1, 0], NaN dropped
    loss = CrossSection().loss(torch.zeros(1, 4), y)
    assert float(loss) == pytest.approx(2 / 3)
