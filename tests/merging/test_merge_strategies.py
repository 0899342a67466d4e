"""Merge strategies over a tiny domain-il stream: merged weights against formulas written out
here, checkpoints in place of fine-tuning, bad inputs, memory accounting and resume."""
import math

import pytest
import torch

from cl_toolkit.errors import ConfigError
from cl_toolkit.merging.atlas import ATLAS
from cl_toolkit.merging.average import MergeAverage
from cl_toolkit.merging.opcm import OPCM, project_exact
from cl_toolkit.merging.task_arithmetic import MergeTA
from cl_toolkit.merging.ties import MergeTIES, MergeTIESFusionBench
from cl_toolkit.merging.task_vectors import (CheckpointNotFoundError, NonFiniteTaskVectorError,
                                             StateDictMismatchError)
from cl_toolkit.models import MLP, Classifier
from cl_toolkit.strategy import RunContext
from cl_toolkit.stream import Task, TaskStream, TensorData


def blobs(angle, n, g):
    """Three Gaussian blobs in 2-D, rotated by ``angle``: one domain of a domain-il stream."""
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    y = torch.randint(3, (n,), generator=g)
    x = centers[y] + 0.5 * torch.randn(n, 2, generator=g)
    c, s = math.cos(angle), math.sin(angle)
    return TensorData(x @ torch.tensor([[c, -s], [s, c]]), y)


def make_stream(n_tasks=3, n=240):
    g = torch.Generator().manual_seed(0)
    tasks = [Task(i, f"rot{30 * i}", blobs(math.radians(30 * i), n, g),
                  blobs(math.radians(30 * i), 120, g), (0, 1, 2)) for i in range(n_tasks)]
    return TaskStream("toy-rotations", tasks, "domain-il", 3, (2,))


def make_model(seed=0):
    torch.manual_seed(seed)
    return Classifier(MLP((2,), hidden=(16,)), 3)


def run(strategy, stream, model=None):
    ctx = RunContext(seed=0, generator=torch.Generator().manual_seed(0))
    strategy.setup(stream, model or make_model(), ctx)
    for task in stream:
        strategy.learn(task)
    return strategy


def fake_checkpoints(tmp_path, model, stream, scale=0.1, seed=1):
    """Fine-tuned checkpoints theta_0 + tau_i with random tau_i, saved in the on-disk format."""
    g = torch.Generator().manual_seed(seed)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths, taus = {}, []
    for task in stream:
        tau = {k: torch.randn(v.shape, generator=g) * scale for k, v in base.items()}
        torch.save({k: base[k] + tau[k] for k in base}, tmp_path / f"{task.name}.pt")
        paths[task.name] = str(tmp_path / f"{task.name}.pt")
        taus.append(tau)
    return base, taus, paths


def merged(strategy):
    return {k: v.clone() for k, v in strategy.model.state_dict().items()}


@pytest.mark.parametrize("name", ["ta", "average", "ties", "ties_fusionbench", "opcm"])
def test_merged_weights_from_checkpoints_match_formulas(tmp_path, name):
    stream, model = make_stream(), make_model()
    base, taus, paths = fake_checkpoints(tmp_path, model, stream)
    if name == "ta":
        got = merged(run(MergeTA(lam=0.3, checkpoints=paths), stream, model))
        expected = {k: base[k] + 0.3 * (taus[0][k] + taus[1][k] + taus[2][k]) for k in base}
    elif name == "average":
        got = merged(run(MergeAverage(checkpoints=paths), stream, model))
        expected = {k: base[k] + (taus[0][k] + taus[1][k] + taus[2][k]) / 3 for k in base}
    elif name == "ties":
        # density 1 and two-way merges: where S and tau agree in sign their mean is taken,
        # where they disagree the larger magnitude wins (its sign is the elected one).
        got = merged(run(MergeTIES(lam=0.5, density=1.0, checkpoints=paths), stream, model))
        S = {k: v.clone() for k, v in taus[0].items()}
        for tau in taus[1:]:
            for k in S:
                a, b = S[k], tau[k]
                S[k] = torch.where(torch.sign(a) == torch.sign(b), (a + b) / 2,
                                   torch.where(a.abs() > b.abs(), a, b))
        expected = {k: base[k] + 0.5 * S[k] for k in base}
    elif name == "ties_fusionbench":
        # density 1, disjoint sum: U += 0.3 * (a + b where the signs agree, else the larger).
        got = merged(run(MergeTIESFusionBench(density=1.0, checkpoints=paths), stream, model))
        U = {k: 0.3 * v for k, v in taus[0].items()}
        for tau in taus[1:]:
            for k in U:
                a, b = U[k], tau[k]
                U[k] = a + 0.3 * torch.where(torch.sign(a) == torch.sign(b), a + b,
                                             torch.where(a.abs() > b.abs(), a, b))
        expected = {k: base[k] + U[k] for k in base}
    else:
        got = merged(run(OPCM(alpha=0.5, checkpoints=paths), stream, model))
        S = {k: v.double() for k, v in taus[0].items()}
        for tau in taus[1:]:
            for k in S:
                is_matrix = k.endswith("weight") and tau[k].dim() == 2
                S[k] = S[k] + (project_exact(S[k], tau[k].double(), 0.5) if is_matrix
                               else tau[k].double())
        mean_norm = sum(math.sqrt(sum(float((t[k].double() ** 2).sum()) for k in t))
                        for t in taus) / 3
        s_norm = math.sqrt(sum(float((v ** 2).sum()) for v in S.values()))
        expected = {k: base[k] + (S[k] * mean_norm / s_norm).float() for k in base}
    for k in base:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [MergeAverage, MergeTA, MergeTIES, MergeTIESFusionBench, OPCM,
                                 ATLAS],
                         ids=lambda c: c.name)
def test_finetuning_path_learns_and_merges(cls):
    stream = make_stream()
    kwargs = {"coef_steps": 30, "k_shot": 4} if cls is ATLAS else {}
    strategy = run(cls(epochs=3, lr=0.05, pretrain_epochs=3, **kwargs), stream)
    ft = strategy.reference_accuracy()["finetuned"]
    assert set(ft) == {t.name for t in stream} and min(ft.values()) > 0.8
    for task in stream:
        acc = (strategy.predict(task.test.x, task).argmax(-1) == task.test.y).float().mean()
        assert acc > 0.6, f"{cls.name} on {task.name}: {acc:.2f}"


def test_memory_bytes_counts_what_each_method_keeps(tmp_path):
    stream, model = make_stream(), make_model()
    _, _, paths = fake_checkpoints(tmp_path, model, stream)
    size = sum(v.numel() * 4 for v in model.state_dict().values())
    opcm = run(OPCM(checkpoints=paths), stream, make_model())
    assert opcm.memory_bytes() == 2 * size + 8 * 3  # theta_0, S, three norms
    ta = run(MergeTA(checkpoints=paths), stream, make_model())
    assert ta.memory_bytes() == 2 * size
    atlas = run(ATLAS(checkpoints=paths, k_shot=2, coef_steps=2), stream, make_model())
    buffer = 3 * 3 * 2 * (2 * 4 + 8 + 8)  # tasks x classes x shots x (x, y, t)
    assert atlas.memory_bytes() == 4 * size + 3 * len(atlas.keys) * 4 + buffer


def test_bad_inputs(tmp_path):
    stream = make_stream()
    other = Classifier(MLP((2,), hidden=(8,)), 3)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    mismatch = r"'backbone.net.1.weight'.*\(8, 2\).*\(16, 2\)"
    with pytest.raises(StateDictMismatchError, match=mismatch):
        run(MergeTA(checkpoints={"rot0": str(tmp_path / "other.pt")}), stream)
    with pytest.raises(CheckpointNotFoundError, match="missing.pt"):
        run(MergeTA(checkpoints={"rot0": str(tmp_path / "missing.pt")}), stream)
    with pytest.raises(ConfigError, match=r"'rot3O'.*Did you mean 'rot30'"):
        run(MergeTA(checkpoints={"rot3O": str(tmp_path / "other.pt")}), stream)
    model = make_model()
    nan = {k: v + float("nan") for k, v in model.state_dict().items()}
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(NonFiniteTaskVectorError, match="task 0 .'rot0'."):
        run(OPCM(checkpoints={"rot0": str(tmp_path / "nan.pt")}), stream, model)
    with pytest.raises(ConfigError, match="matches no floating-point entry"):
        run(MergeTA(finetune_params=["encoder."]), stream)


def test_finetune_params_limit_what_changes(tmp_path):
    stream = make_stream()
    strategy = run(MergeTA(epochs=1, finetune_params=["head."]), stream)
    assert strategy.keys == ["head.weight", "head.bias"]
    before = make_model().state_dict()
    after = strategy.model.state_dict()
    assert torch.equal(before["backbone.net.1.weight"], after["backbone.net.1.weight"])
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    stream, model = make_stream(), make_model()
    _, _, paths = fake_checkpoints(tmp_path, model, stream)
    full = merged(run(OPCM(checkpoints=paths), stream, make_model()))
    first = OPCM(checkpoints=paths)
    first.setup(stream, make_model(), RunContext())
    first.learn(stream[0])
    first.learn(stream[1])
    torch.save(first.state_dict(), tmp_path / "state.pt")
    second = OPCM(checkpoints=paths)
    second.setup(stream, make_model(), RunContext())
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    second.learn(stream[2])
    for k, v in full.items():
        torch.testing.assert_close(second.model.state_dict()[k], v)


def test_frozen_batchnorm_statistics_do_not_drift():
    stream = make_stream()
    torch.manual_seed(0)
    model = Classifier(MLP((2,), hidden=(16,)), 3)
    model.backbone.net.append(torch.nn.BatchNorm1d(16))
    before = model.backbone.net[-1].running_mean.clone()
    strategy = run(MergeTA(epochs=1, finetune_params=["head."]), stream, model)
    assert torch.equal(strategy.model.backbone.net[-1].running_mean, before)


@pytest.mark.parametrize("objective", ["entropy", "pseudo_label"])
def test_atlas_without_labels_keeps_unlabelled_inputs(tmp_path, objective):
    stream, model = make_stream(), make_model()
    _, _, paths = fake_checkpoints(tmp_path, model, stream)
    atlas = run(ATLAS(checkpoints=paths, k_shot=0, unlabeled_per_task=10,
                      unsupervised=objective, coef_steps=5), stream, model)
    # A quarter of each task's inputs (2 of 10, rounded) is held out for validation.
    assert [len(b) for b in atlas.buffer] == [8, 8, 8]
    assert [len(b) for b in atlas.val_buffer] == [2, 2, 2]
    assert atlas.coefs.shape == (3, len(atlas.keys))
    if objective == "entropy":  # pseudo-labels may find no prediction confident enough here
        assert bool(atlas.coefs.abs().sum() > 0)
    with pytest.raises(ConfigError, match="'mse'"):
        ATLAS(unsupervised="mse")


@pytest.mark.parametrize("warm_start", [False, True])
def test_atlas_coefficients_restart_from_zero_unless_warm_start(tmp_path, monkeypatch, warm_start):
    """The paper learns every coefficient from 0; warm_start keeps earlier values instead."""
    from cl_toolkit.merging import atlas as atlas_module
    starts = []

    def spy(model, base, tvs, data, objective, start, **kwargs):
        starts.append(start.clone())
        return start + 1.0  # stands in for what the fit learned
    monkeypatch.setattr(atlas_module, "fit_coefficients", spy)
    stream, model = make_stream(), make_model()
    _, _, paths = fake_checkpoints(tmp_path, model, stream)
    run(ATLAS(checkpoints=paths, k_shot=2, warm_start=warm_start), stream, model)
    assert [s.shape[0] for s in starts] == [1, 2, 3]
    for t in (1, 2):
        for i in range(t + 1):  # vector i has been fitted t - i times before step t
            want = float(t - i) if warm_start else 0.0
            assert torch.equal(starts[t][i], torch.full_like(starts[t][i], want))


# Three task vectors of five entries; trimming to density 0.4 keeps the top k = 2 magnitudes
# of each (ties kept: tau2's two 2.0s both stay).
TAU1 = torch.tensor([1.0, -2.0, 0.5, 4.0, -1.0], dtype=torch.float64)
TAU2 = torch.tensor([2.0, 1.0, -3.0, -0.5, -2.0], dtype=torch.float64)
TAU3 = torch.tensor([-1.0, 0.5, 1.0, 3.0, 2.0], dtype=torch.float64)


def fold(strategy, taus):
    """Feed task vectors straight to ``merge_`` (no model) and return each merged update."""
    updates = []
    for t, tau in enumerate(taus):
        strategy.tasks_seen = t
        strategy.merge_({"w": tau.clone()}, None)
        update, scale = strategy.merged_update()
        updates.append(scale * update["w"])
    return updates


def test_fusionbench_continual_ties_by_hand():
    """theta_t - theta_0 = U_t with U_1 = 0.3 tau_1 (untrimmed) and
    U_t = U_{t-1} + 0.3 * TIES_sum(U_{t-1}, tau_t), worked out by hand:
    U_1 = [.3, -.6, .15, 1.2, -.3]; trimmed U_1 = [0, -.6, 0, 1.2, 0], trimmed tau_2 =
    [2, 0, -3, 0, -2] -> TIES_sum [2, -.6, -3, 1.2, -2] -> U_2 = [.9, -.78, -.75, 1.56, -.9];
    trimmed U_2 = [.9, 0, 0, 1.56, -.9] (the two .9s tie), trimmed tau_3 = [0, 0, 0, 3, 2] ->
    signs [+, 0, 0, +, +] -> TIES_sum [.9, 0, 0, 4.56, 2] (entry 3 adds both, entry 4 keeps
    only tau_3's 2) -> U_3 = [1.17, -.78, -.75, 2.928, -.3]."""
    updates = fold(MergeTIESFusionBench(lam=0.3, density=0.4), [TAU1, TAU2, TAU3])
    expected = [[0.3, -0.6, 0.15, 1.2, -0.3], [0.9, -0.78, -0.75, 1.56, -0.9],
                [1.17, -0.78, -0.75, 2.928, -0.3]]
    for got, want in zip(updates, expected):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64),
                                   rtol=0, atol=1e-12)
    assert MergeTIESFusionBench().lam == 0.3 and MergeTIESFusionBench().reduce == "sum"


def test_default_continual_ties_by_hand():
    """The default keeps its recorded form, S_t = TIES_mean(S_{t-1}, tau_t), theta = theta_0 +
    lam * S_t, tau_1 trimmed at step 1: S_1 = [0, -2, 0, 4, 0]; S_2 = [2, -2, -3, 4, -2] (no
    entry overlaps); trimmed S_2 = [0, 0, -3, 4, 0] with trimmed tau_3 = [0, 0, 0, 3, 2] ->
    S_3 = [0, 0, -3, 3.5, 2] (entry 3: the mean of 4 and 3)."""
    updates = fold(MergeTIES(lam=1.0, density=0.4), [TAU1, TAU2, TAU3])
    expected = [[0.0, -2, 0, 4, 0], [2.0, -2, -3, 4, -2], [0.0, 0, -3, 3.5, 2]]
    for got, want in zip(updates, expected):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=0)


def test_buffers_get_no_coefficient(tmp_path):
    """BatchNorm running statistics are merged entries but not task-vector directions: aTLAS
    learns coefficients for parameters only and the merged model keeps theta_0's buffers."""
    from torch import nn

    from cl_toolkit.merging.atlas import fit_coefficients

    def model_with_bn():
        torch.manual_seed(0)
        model = Classifier(MLP((2,), hidden=(16,)), 3)
        model.backbone.net.append(nn.BatchNorm1d(16))
        return model.eval()

    stream, model = make_stream(), model_with_bn()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    paths, taus = {}, []
    for task in stream:
        tau = {k: torch.randn(v.shape, generator=g) * 0.1 if v.is_floating_point()
               else torch.zeros_like(v) for k, v in base.items()}
        torch.save({k: base[k] + tau[k] for k in base}, tmp_path / f"{task.name}.pt")
        paths[task.name], _ = str(tmp_path / f"{task.name}.pt"), taus.append(tau)
    atlas = run(ATLAS(checkpoints=paths, k_shot=4, coef_steps=20, val_fraction=0.0), stream,
                model_with_bn())
    params = [n for n, _ in model.named_parameters()]
    assert "backbone.net.3.running_mean" in atlas.keys
    assert atlas.coef_keys == params
    assert atlas.coefs.shape == (3, len(params)) and bool(atlas.coefs.abs().sum() > 0)
    merged = atlas.model.state_dict()
    for k in ("backbone.net.3.running_mean", "backbone.net.3.running_var"):
        assert torch.equal(merged[k], base[k])
    for j, k in enumerate(params):
        want = base[k] + sum(atlas.coefs[i, j] * taus[i][k] for i in range(3))
        torch.testing.assert_close(merged[k], want)
    with pytest.raises(ValueError, match="buffers"):
        fit_coefficients(atlas.model, atlas.base, [taus[0]], stream[0].train)


class AuxClassifier(Classifier):
    """Sets ``aux_loss`` on every forward, as MoM's router balance does."""

    aux_value = 0.0

    def forward(self, x, t=None):
        out = super().forward(x, t)
        self.last_aux = out.sum() * 0.0 + self.aux_value
        return out

    @property
    def aux_loss(self):
        return getattr(self, "last_aux", None)


def test_finetuning_runs_through_the_trainer_hooks_and_aux_loss():
    """Fine-tuning is the run's training loop: hooks see every step with the strategy and the
    task, and the model's auxiliary loss is part of the loss (a NaN one stops the run, named)."""
    from cl_toolkit.errors import NonFiniteLossError

    stream = make_stream(n=128)
    seen = []
    ctx = RunContext(seed=0, generator=torch.Generator().manual_seed(0))
    ctx.hooks.after_batch.append(lambda strategy, task, epoch, step, loss:
                                 seen.append((type(strategy).__name__, task.name, step)))
    strategy = MergeTA(epochs=1, batch_size=64, pretrain_epochs=1)
    strategy.setup(stream, make_model(), ctx)
    strategy.learn(stream[0])
    # two steps of pretraining on task 0, then two of fine-tuning task 0
    assert seen == [("MergeTA", "rot0", 0), ("MergeTA", "rot0", 1)] * 2
    torch.manual_seed(0)
    model = AuxClassifier(MLP((2,), hidden=(16,)), 3)
    model.aux_value = float("nan")
    strategy = MergeTA(epochs=1)
    strategy.setup(stream, model, RunContext())
    with pytest.raises(NonFiniteLossError, match=r"fine-tuning task 0 \('rot0'\), epoch 0"):
        strategy.learn(stream[0])


def test_atlas_fit_ignores_the_aux_loss_and_names_a_diverged_step(tmp_path):
    """The coefficient objective is the paper's alone (a model's aux loss is not added), and a
    non-finite loss is reported by the trainer, naming the fit and its learning-rate key."""
    from cl_toolkit.errors import NonFiniteLossError
    from cl_toolkit.merging.atlas import fit_coefficients

    stream = make_stream()
    torch.manual_seed(0)
    model = AuxClassifier(MLP((2,), hidden=(16,)), 3).eval()
    base = {k: v.clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    tvs = [{k: torch.randn(v.shape, generator=g) * 0.1 for k, v in base.items()}]
    fits = []
    for aux in (0.0, float("nan")):
        model.aux_value = aux
        fits.append(fit_coefficients(model, base, tvs, stream[0].train, steps=5,
                                     generator=torch.Generator().manual_seed(0)))
    assert torch.equal(fits[0], fits[1])
    model.aux_value = 0.0
    nan = [{k: v * float("nan") for k, v in tvs[0].items()}]
    with pytest.raises(NonFiniteLossError, match=r"aTLAS coefficient fit.*step 0.*coef_lr"):
        fit_coefficients(model, base, nan, stream[0].train, steps=5)


@pytest.mark.parametrize("cls", [MergeAverage, MergeTA, MergeTIES, MergeTIESFusionBench, OPCM,
                                 ATLAS], ids=lambda c: c.name)
def test_merge_strategies_declare_what_they_support(cls):
    """Read by the runner before anything runs: classification only (fine-tuning is
    cross-entropy on class logits), every scenario, no train_step for a probe."""
    assert cls.task_kinds == ("classification",)
    assert set(cls.scenarios) == {"task-il", "class-il", "domain-il"}
    assert "train_step" not in cls.capabilities
