"""KCL strategy (https://arxiv.org/abs/2107.05757) on tiny synthetic streams."""
import io

import numpy as np
import pytest
import torch
from torch import nn

from cl_toolkit.errors import ClToolkitError, ConfigError
from cl_toolkit.models import MLP, Classifier
from cl_toolkit.strategies.kcl import KCL, normalise_features
from cl_toolkit.strategy import RunContext
from cl_toolkit.stream import Task, TaskStream, TensorData


def blob_stream(n_tasks=3, per_task=2, dim=16, n_train=60, n_test=40, scenario="task-il",
                seed=0):
    """Each class is a noisy binary prototype in [0, 1]^dim (n_train samples per class)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(n_tasks * per_task, dim, generator=g).round()

    def sample(classes, n):
        y = torch.tensor(classes).repeat_interleave(n)
        x = (0.8 * protos[y] + 0.1 + 0.2 * torch.randn(len(y), dim, generator=g)).clamp(0, 1)
        return TensorData(x, y)

    tasks = []
    for i in range(n_tasks):
        cls = tuple(range(i * per_task, (i + 1) * per_task))
        tasks.append(Task(i, f"task{i}", sample(cls, n_train), sample(cls, n_test), cls))
    return TaskStream("blobs", tasks, scenario, n_tasks * per_task, (dim,))


def make(stream, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = Classifier(MLP(stream.input_shape, (32, 32)), stream.num_classes)
    kwargs = {"coreset_per_class": 10, "lr": 0.05, **kwargs}
    strategy = KCL(**kwargs)
    ctx = RunContext(seed=seed, generator=torch.Generator().manual_seed(seed))
    strategy.setup(stream, model, ctx)
    return strategy


def accuracy(strategy, task):
    return (strategy.predict(task.test.x, task).argmax(1) == task.test.y).float().mean().item()


@pytest.mark.parametrize("kernel", ["linear", "gaussian", "laplacian", "rff", "vrf"])
def test_kcl_beats_chance_on_a_task_il_stream(kernel):
    stream = blob_stream()
    s = make(stream, kernel=kernel, num_features=256)
    for task in stream:
        s.learn(task)
    accs = [accuracy(s, t) for t in stream]
    assert min(accs) > 0.85, accs  # chance is 0.5


@pytest.mark.parametrize("kernel", ["linear", "gaussian", "laplacian", "rff", "vrf"])
def test_training_lowers_the_query_loss_through_extractor_and_machine(kernel):
    stream = blob_stream(n_tasks=1, n_train=150)
    s = make(stream, kernel=kernel, num_features=256, epochs=3)
    losses = []
    s.ctx.hooks.after_batch.append(lambda loss, **_: losses.append(loss.item()))
    w0 = s.model.backbone.net[1].weight.detach().clone()
    s.learn(stream[0])
    q = len(losses) // 4
    assert np.mean(losses[-q:]) < 0.5 * np.mean(losses[:q])
    assert s.machine.gamma[0].item() > 1.5  # the temperature is learned
    assert not torch.allclose(s.model.backbone.net[1].weight, w0)  # so is the extractor


def test_batch_split_support_also_learns():
    stream = blob_stream()
    s = make(stream, kernel="rff", support="batch", num_features=256)
    for task in stream:
        s.learn(task)
    assert np.mean([accuracy(s, t) for t in stream]) > 0.8


def test_batch_split_with_a_one_sample_last_batch_and_tiny_batches():
    stream = blob_stream(n_tasks=1)
    # 2 x 60 samples - 2 x 10 coreset = 100 left; batches of 11 leave a last batch of 1.
    s = make(stream, kernel="vrf", support="batch", batch_size=11, num_features=64)
    s.learn(stream[0])
    assert accuracy(s, stream[0]) > 0.8
    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        KCL(support="batch", batch_size=1)


def test_logits_live_in_the_global_label_space():
    stream = blob_stream()
    s = make(stream, kernel="linear")
    s.learn(stream[0])
    out = s.predict(stream[0].test.x, stream[0])
    assert out.shape == (80, 6)
    assert torch.isfinite(out[:, :2]).all() and torch.isneginf(out[:, 2:]).all()
    unseen = s.predict(stream[2].test.x, stream[2])  # not learned yet: uninformative zeros
    assert (unseen[:, 4:] == 0).all() and torch.isneginf(unseen[:, :4]).all()


def test_coreset_is_taken_out_of_the_training_data_and_kept_raw():
    stream = blob_stream()
    s = make(stream, coreset_per_class=7)
    train = s.begin_task(stream[1])
    core = s.coresets[1]
    assert len(core) == 14 and len(train) == 120 - 14
    assert sorted(core.y.tolist()) == [2] * 7 + [3] * 7
    rows = {tuple(r) for r in stream[1].train.x.tolist()}
    assert all(tuple(r) in rows for r in core.x.tolist())  # raw inputs, unchanged
    assert not {tuple(r) for r in core.x.tolist()} & {tuple(r) for r in train.x.tolist()}
    assert s.memory_bytes() == 14 * 16 * 4 + 14 * 8


def test_coreset_larger_than_a_class_is_refused():
    stream = blob_stream(n_train=5)
    s = make(stream, coreset_per_class=6)
    with pytest.raises(ConfigError, match="class 0 of task 0.*only 5"):
        s.learn(stream[0])


def test_unknown_support_mode_kernel_and_feature_norm_are_refused():
    with pytest.raises(ConfigError, match="coreset"):
        KCL(support="query")
    with pytest.raises(ConfigError, match="batch_minmax"):
        KCL(feature_norm="max")
    with pytest.raises(ConfigError, match="Did you mean 'vrf'"):
        make(blob_stream(), kernel="vfr")


def test_every_task_is_scored_with_its_own_lambda_gamma_beta():
    """Oracle: numpy primal ridge on the task's coreset features with that task's values (the
    public reference scores every task with the current task's values; this would catch it)."""
    stream = blob_stream()
    s = make(stream, kernel="linear")
    for task in stream:
        s.learn(task)
    values = {0: (0.05, 0.7, 0.3), 1: (2.0, 1.9, -0.4), 2: (0.5, 1.2, 0.1)}
    with torch.no_grad():
        for t, (lam, gamma, beta) in values.items():
            s.machine.raw_lambda[t] = lam - s.machine.lambda_min
            s.machine.gamma[t], s.machine.beta[t] = gamma, beta
    for t, (lam, gamma, beta) in values.items():
        task = stream[t]
        got = s.predict(task.test.x, task)[:, list(task.classes)].double().numpy()
        with torch.no_grad():
            hc = s.model.backbone(s.coresets[t].x).double().numpy()
            hq = s.model.backbone(task.test.x).double().numpy()
        hc = hc / np.linalg.norm(hc, axis=1, keepdims=True)  # feature_norm="l2" (default)
        hq = hq / np.linalg.norm(hq, axis=1, keepdims=True)
        Y = np.eye(2)[s.coresets[t].y.numpy() - task.classes[0]]
        d = hc.shape[1]
        w = np.linalg.lstsq(np.vstack([hc, np.sqrt(lam) * np.eye(d)]),
                            np.vstack([Y, np.zeros((d, 2))]), rcond=None)[0]
        np.testing.assert_allclose(got, gamma * hq @ w + beta, rtol=1e-3, atol=1e-3)


def test_resume_restores_predictions_exactly():
    stream = blob_stream()
    s = make(stream, kernel="vrf", num_features=128)
    for task in stream.tasks[:2]:
        s.learn(task)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    r = make(stream, seed=123, kernel="vrf", num_features=128)  # different init everywhere
    r.load_state_dict(torch.load(buf))
    for task in stream:
        torch.testing.assert_close(r.predict(task.test.x, task), s.predict(task.test.x, task),
                                   rtol=0, atol=0)
    assert r.memory_bytes() == s.memory_bytes() > 0


def test_class_il_extension_scores_every_learned_task():
    stream = blob_stream(scenario="class-il")
    s = make(stream, kernel="rff", num_features=256)
    for task in stream.tasks[:2]:
        s.learn(task)
    out = s.predict(stream[0].test.x, stream[0])
    assert torch.isfinite(out[:, :4]).all() and torch.isneginf(out[:, 4:]).all()
    s.learn(stream[2])
    x = torch.cat([t.test.x for t in stream])
    y = torch.cat([t.test.y for t in stream])
    acc = (s.predict(x, stream[0]).argmax(1) == y).float().mean().item()
    assert acc > 0.6  # chance is 1/6


def test_diverging_features_stop_with_task_and_step():
    stream = blob_stream()
    stream[1].train.x[:] = float("nan")
    s = make(stream, kernel="linear")
    s.learn(stream[0])
    with pytest.raises(ClToolkitError, match="task 1.*step 0"):
        s.learn(stream[1])


@pytest.mark.parametrize("how", ["none", "l2", "minmax", "batch_minmax"])
def test_feature_normalisations(how):
    h = torch.tensor([[0.0, 2.0, 4.0], [1.0, 1.0, 3.0]])
    expected = {
        "none": h,
        "l2": h / h.norm(dim=1, keepdim=True),
        "minmax": torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.0, 1.0]]),
        "batch_minmax": h / 4.0,
    }[how]
    torch.testing.assert_close(normalise_features(h, how), expected)


def test_a_hook_may_predict_during_training():
    stream = blob_stream(n_tasks=2)
    s = make(stream, kernel="linear")
    s.learn(stream[0])
    seen = []

    def probe(strategy, task, epoch, step, loss):
        before = strategy.predict(stream[0].test.x, stream[0])
        seen.append((strategy.model.training, before))

    s.ctx.hooks.after_batch.append(probe)
    s.learn(stream[1])
    assert all(training for training, _ in seen)  # train mode restored after each probe
    assert not torch.equal(seen[0][1], seen[-1][1])  # re-solved with the moving extractor


class BatchStandardiser(nn.Module):
    """A backbone that is one BatchNorm without affine: in training mode the features of every
    forward pass have mean 0 over that pass, so a mixed pass is visible in the features."""

    def __init__(self, dim):
        super().__init__()
        self.bn, self.feat_dim = nn.BatchNorm1d(dim, affine=False), dim

    def forward(self, x):
        return self.bn(x)


@pytest.mark.parametrize("support", ["coreset", "batch"])
def test_support_and_query_go_through_separate_forward_passes(support):
    """As the reference code: BatchNorm statistics of the support never mix with the query's."""
    stream = blob_stream(n_tasks=1)
    torch.manual_seed(0)
    model = Classifier(BatchStandardiser(16), stream.num_classes)
    s = KCL(kernel="linear", coreset_per_class=10, feature_norm="none", support=support)
    s.setup(stream, model, RunContext(seed=0, generator=torch.Generator().manual_seed(0)))
    seen = []
    forward = s.machine.forward

    def spy(t, hs, ys, hq, *args, **kwargs):
        seen.append((hs.detach(), hq.detach()))
        return forward(t, hs, ys, hq, *args, **kwargs)

    s.machine.forward = spy
    s.learn(stream[0])
    assert len(seen) > 5
    for hs, hq in seen:
        torch.testing.assert_close(hs.mean(0), torch.zeros(16), rtol=0, atol=1e-5)
        torch.testing.assert_close(hq.mean(0), torch.zeros(16), rtol=0, atol=1e-5)
