"""The retention probe (Orhan 2023): its measures against fake language models with a known loss
or a known continuation, its study exposures and schedule, and probes from the config."""
import math

import pytest
import torch
from torch import nn

from cl_toolkit import registry
from cl_toolkit.errors import ConfigError
from cl_toolkit.probes import check_compatible
from cl_toolkit.probes.retention import RetentionProbe, cached_step
from cl_toolkit.probes.retention_metrics import log_spaced, recall, recognition, sequence_loss
from cl_toolkit.runner import run
from cl_toolkit.strategies.naive import Naive
from cl_toolkit.strategy import RunContext
from cl_toolkit.stream import Task, TaskStream, TensorData
from interrupt import run_until


class KnownLossLM(nn.Module):
    """Knows a table of sequences, each with a confidence c: at every position it puts logit c
    on the sequence's next token and 0 elsewhere, so its loss on that sequence is
    log(1 + (V - 1) e^-c). A row is identified by its first ``key`` tokens."""

    uses_task_id = False

    def __init__(self, vocab, table, key=4):
        super().__init__()
        self.vocab, self.key = vocab, key
        self.table = {tuple(s[:key].tolist()): (s, c) for s, c in table}

    def forward(self, x, t=None):
        logits = torch.zeros(*x.shape, self.vocab)
        for i, row in enumerate(x):
            seq, c = self.table[tuple(row[:self.key].tolist())]
            logits[i, torch.arange(x.shape[1]), seq[1:x.shape[1] + 1]] = c
        return logits


class CountingLM(nn.Module):
    """Always predicts the next token as (last + 1) mod V: a known greedy continuation."""

    uses_task_id = False

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x, t=None):
        return torch.nn.functional.one_hot((x + 1) % self.vocab, self.vocab).float()


class FakeStrategy:
    def __init__(self, model):
        self.model = model

    def predict(self, x, task):
        return self.model(x, None)


def token_stream(vocab=16, length=8, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, (n, length + 1), generator=g)
    data = TensorData(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    task = Task(index=0, name="tokens/0", train=data, test=data, classes=())
    return TaskStream(name="tokens", tasks=[task], scenario="domain-il", num_classes=vocab,
                      input_shape=(length,), vocab_size=vocab)


def test_sequence_loss_and_recognition_match_hand_computed_values():
    V = 10
    seqs = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 7],
                         [3, 4, 5, 6, 7, 8], [4, 5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 0],
                         [6, 7, 8, 9, 0, 1], [7, 8, 9, 0, 1, 2]])
    conf = [2.0, 1.0, 3.0, 5.0, 1.0, 2.0, 3.0, 0.0]
    model = KnownLossLM(V, list(zip(seqs, conf)), key=1)
    loss = sequence_loss(model(seqs[:, :-1]), seqs)
    expected = torch.tensor([math.log(1 + (V - 1) * math.exp(-c)) for c in conf])
    torch.testing.assert_close(loss, expected)
    studied, foil = loss[:4], loss[4:]
    # c: 2 vs 1 -> win, 1 vs 2 -> loss, 3 vs 3 -> tie, 5 vs 0 -> win: (1 + 0 + 0.5 + 1) / 4
    assert recognition(studied, foil) == pytest.approx(0.625)


def test_recall_continues_freely_from_the_first_half():
    model = CountingLM(10)
    seqs = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7],    # exact
                         [0, 1, 2, 3, 4, 5, 9, 7],    # greedy 4 5 6 7: 3 of 4 right
                         [5, 6, 7, 8, 0, 0, 0, 0],    # greedy 9 0 1 2: 1 of 4 right
                         [3, 4, 5, 6, 7, 9, 9, 9]])   # greedy 7 8 9 0: 2 of 4 right
    exact, acc = recall(lambda ids: model(ids), seqs)
    assert exact.tolist() == [True, False, False, False]
    # Teacher forcing would give 2/4, 1/4 and 2/4 (and 1/4 for the third); the free-running
    # continuation re-synchronises after the error in row 1.
    torch.testing.assert_close(acc, torch.tensor([1.0, 0.75, 0.25, 0.5]))
    exact2, acc2 = recall(lambda ids: model(ids), seqs, model(seqs[:, :-1]))
    assert exact2.tolist() == exact.tolist() and torch.equal(acc2, acc)


def test_log_spaced_schedule():
    assert log_spaced(100) == [0, 1, 3, 10, 30, 100]
    assert log_spaced(0) == [0] and log_spaced(2) == [0, 1] and log_spaced(299) == \
        [0, 1, 3, 10, 30, 100]
    assert log_spaced(1000) == [0, 1, 3, 10, 30, 100, 300, 1000]


class BigramLM(nn.Module):
    """A next-token table: it can learn the studied strings' bigrams, nothing else."""

    uses_task_id = False

    def __init__(self, vocab):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        nn.init.zeros_(self.table.weight)

    def forward(self, x, t=None):
        return self.table(x)


def train_with_probe(probe, stream, lr=30.0, epochs=2):
    strategy = Naive(epochs=epochs, batch_size=8, lr=lr, optimizer="sgd")
    ctx = RunContext(seed=0, generator=torch.Generator().manual_seed(0))
    from cl_toolkit import probes

    probes.attach(probe, stream, ctx)
    strategy.setup(stream, BigramLM(stream.vocab_size), ctx)
    strategy.learn(stream[0])
    return strategy


def lm_cfg(**probe):
    return {"seed": 0, "threads": 1,
            "benchmark": {"name": "fortunes", "files": ["a", "b"], "seq_len": 16,
                          "max_train": 48, "max_test": 8},
            "model": {"name": "gdn_lm", "hidden_size": 16, "num_layers": 1, "num_heads": 1},
            "strategy": {"name": "naive", "epochs": 1, "batch_size": 8, "lr": 0.01,
                         "optimizer": "adam"},
            "probe": {"name": "retention", "study_after": 2, "n_study": 2, "length": 12,
                      "exposures": [1, 3], "schedule": [0, 1, 3], **probe}}


def test_probe_on_a_non_language_model_run_is_refused(tmp_path):
    cfg = {"seed": 0, "benchmark": {"name": "split_digits"}, "model": {"name": "mlp"},
           "strategy": {"name": "naive", "epochs": 1}, "probe": {"name": "retention"}}
    with pytest.raises(ConfigError, match="needs a language-model run.*model=mom_lm"):
        run(cfg, tmp_path)


def test_unknown_probe_name_and_key_are_refused(tmp_path):
    digits = {"seed": 0, "benchmark": {"name": "split_digits"}, "model": {"name": "mlp"},
              "strategy": {"name": "naive", "epochs": 1}}
    with pytest.raises(ConfigError, match="Unknown probe 'retension'.*'retention'"):
        run({**digits, "probe": {"name": "retension"}}, tmp_path / "a")
    with pytest.raises(ConfigError, match="probe.exposres.*exposures"):
        run({**digits, "probe": {"name": "retention", "exposres": [1]}}, tmp_path / "b")
    with pytest.raises(ConfigError, match="probe.stimuli=\\[random\\]"):
        RetentionProbe().setup(token_stream(vocab=16), RunContext())
    assert "retention" in registry.names("probe")


def test_config_group_composes_and_defaults_to_no_probe():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("cl_toolkit.conf", version_base=None):
        plain = OmegaConf.to_container(compose("config"), resolve=False)
        cfg = OmegaConf.to_container(compose("config", ["probe=retention"]), resolve=False)
    assert plain.get("probe") is None
    node = dict(cfg["probe"])
    assert node.pop("name") == "retention"
    registry.check_kwargs(RetentionProbe, node, "probe")
    assert node["exposures"] == [1, 3, 10] and node["stimuli"] == ["fortunes", "random"]
    assert node["n_study"] == 64 and node["study_after"] is None
    assert node["exposure"] == "epochs" and node["retention_corpus"] == "python_source"
    assert RetentionProbe(**node).schedule == [0, 1, 3, 10, 30, 100, 300, 1000]


@pytest.fixture
def corpus(tmp_path):
    """Two small strfile files: training text, and held-out quotations for the probe."""
    root = tmp_path / "corpus"
    root.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    for f, name in enumerate(["a", "b"]):
        quotes = [f"{words[i % 8]} {words[(i * 3 + f) % 8]} quote number {i} of file {name}."
                  for i in range(160)]
        (root / name).write_text("\n%\n".join(quotes) + "\n%\n")
    return root


def test_run_with_probe_writes_the_curve_and_resume_continues_it(tmp_path, corpus):
    cfg = lm_cfg(path=str(corpus), files=["a", "b"])
    cfg["benchmark"]["path"] = str(corpus)
    full = run(cfg, tmp_path / "full")
    curve = full["extras"]["retention"]
    assert curve["study_update"] == 2 and curve["updates"] == 12
    assert sorted({r["updates"] for r in curve["points"]}) == [0, 1, 3]
    # every (kind, branch, point) has the studied set and the unstudied control
    assert sorted((r["stimuli"], r["k"], r["updates"], r["set"]) for r in curve["points"]) == \
        sorted((s, k, u, w) for s in ("fortunes", "random") for k in (1, 3) for u in (0, 1, 3)
               for w in ("studied", "control"))
    assert curve["study_steps"] == [[1, 1], [3, 3]]  # 4 studied sequences, batches of 8

    run_until(cfg, tmp_path / "cut", task_index=1, at_step=2)
    resumed = run({**cfg, "resume": True}, tmp_path / "cut")
    keep = ("points", "before", "updates", "study_update", "study_steps")
    assert {k: resumed["extras"]["retention"][k] for k in keep} == {k: curve[k] for k in keep}


class RunningSumLM(nn.Module):
    """Predicts (sum of all tokens so far) mod V; ``step`` carries the sum as its cache, like
    the shared backbone's ``SequenceLanguageModel.step``."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x, t=None):
        return torch.nn.functional.one_hot(x.cumsum(1) % self.vocab, self.vocab).float()

    def step(self, x, caches=None, t=None):
        start = 0 if caches is None else caches
        sums = start + x.cumsum(1)
        return torch.nn.functional.one_hot(sums % self.vocab, self.vocab).float(), sums[:, -1:]


def test_cached_decoding_gives_the_recall_of_full_forward_decoding():
    """The oracle is decoding by full forward passes over the growing prefix."""
    from cl_toolkit.models.language import TokenModel

    stream = token_stream(vocab=7, length=10)
    model = TokenModel(RunningSumLM(7), 7)
    step = cached_step(model, stream[0], task_il=False)
    seqs = torch.randint(7, (32, 10), generator=torch.Generator().manual_seed(1))
    full = recall(lambda ids: model(ids), seqs)
    cached = recall(lambda ids: model(ids), seqs, step=step)
    assert torch.equal(full[0], cached[0]) and torch.equal(full[1], cached[1])
    assert 0 < full[1].mean() < 1 and full[1].unique().numel() > 2


def test_cached_decoding_hands_the_task_id_only_in_task_il_to_a_task_routed_model():
    from cl_toolkit.models.language import TokenModel

    seen = []

    class Routed(RunningSumLM):
        uses_task_id = True

        def step(self, x, caches=None, t=None):
            seen.append(None if t is None else t.tolist())
            return super().step(x, caches, t)

    task = Task(index=2, name="t2", train=None, test=None, classes=())
    ids = torch.zeros(3, 4, dtype=torch.long)
    cached_step(TokenModel(Routed(7), 7), task, task_il=True)(ids, None)
    cached_step(TokenModel(Routed(7), 7), task, task_il=False)(ids, None)
    assert seen == [[2, 2, 2], None]
    assert cached_step(BigramLM(7), task, task_il=True) is None  # no language-model step


def point(set_, updates, k=3, rec=0.5, gap=0.0, stimuli="random", **more):
    return {"stimuli": stimuli, "set": set_, "k": k, "updates": updates, "recognition": rec,
            "recall_exact": 0.0, "recall_token": 0.5, "recall_rouge": 0.5,
            "loss_studied": 2.0, "loss_foil": 2.0 + gap, **more}


def test_renderer_reads_every_effect_against_the_control_with_a_t_interval(tmp_path):
    from cl_toolkit.renderers.retention import render

    def result(seed, rec_s, rec_c, gap_s, gap_c):
        before = [point("studied", None, None, 0.5, 0.1), point("control", None, None, 0.25,
                                                                 -0.2)]
        points = [point("studied", 0, rec=rec_s, gap=gap_s),
                  point("control", 0, rec=rec_c, gap=gap_c)]
        return {"config": {"seed": seed, "model": {"name": "gdn_lm"}},
                "extras": {"retention": {"before": before, "points": points}}}

    # recognition minus control: 0.9 - 0.5 = 0.4, 0.7 - 0.5 = 0.2, 0.8 - 0.6 = 0.2 -> mean
    # 26.67 points, sd 11.547, CI 4.303 * 11.547 / sqrt(3) = 28.69 points. Loss gain minus the
    # control's: (0.6 - 0.1) - (0.3 - -0.2) = 0.0, (0.9 - 0.1) - (0.3 + 0.2) = 0.3,
    # (0.6 - 0.1) - (0.1 + 0.2) = 0.2 -> mean 0.1667, sd 0.1528, CI 0.3795.
    runs = [result(0, 0.9, 0.5, 0.6, 0.3), result(1, 0.7, 0.5, 0.9, 0.3),
            result(2, 0.8, 0.6, 0.6, 0.1)]
    md, page = render(runs + [{"config": {}, "metrics": {}}], tmp_path)
    assert "| gdn_lm | random | 3 | +25 ± 0 | +27 ± 29 | 3 |" in md
    assert "| gdn_lm | random | 3 |  | +0.17 ± 0.38 | 3 |" in md
    # the control as measured: recognition 25 before, (50 + 50 + 60) / 3 = 53 at 0 (CI
    # 4.303 * 5.774 / sqrt(3) = 14.3); its own loss drift 0.5, 0.5, 0.3
    assert "| gdn_lm | random | 0 (control) | 25 ± 0 | 53 ± 14 | 3 |" in md
    assert "| gdn_lm | random | 0 (control) |  | +0.43 ± 0.29 | 3 |" in md
    assert (tmp_path / "retention_gdn_lm.png").stat().st_size > 1000
    assert "data:image/png;base64," in page
    assert render([{"config": {}}], tmp_path) == ("", "")
    # a run with the same seed twice counts once (its values averaged)
    md2, _ = render(runs + [result(2, 0.8, 0.6, 0.6, 0.1)], tmp_path)
    assert "| gdn_lm | random | 3 | +25 ± 0 | +27 ± 29 | 3 |" in md2
    one, _ = render(runs[:1], tmp_path)
    assert "| gdn_lm | random | 3 | +25 | +40 | 1 |" in one  # no interval from one seed


def test_mean_ci_uses_the_t_quantile():
    from cl_toolkit.probes.retention_metrics import mean_ci, t975

    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3))
    assert mean_ci([4.0, 6.0])[1] == pytest.approx(12.706 * 1.0)  # sd sqrt(2), se 1
    assert mean_ci([5.0]) == (5.0, None)
    assert t975(10) == 2.228 and t975(45) == 2.021 and t975(5000) == 1.96


def test_a_strategy_without_train_step_is_refused_before_the_run_and_at_the_study():
    from cl_toolkit.merging.task_arithmetic import MergeTA

    probe = RetentionProbe()
    assert probe.requires == frozenset({"train_step"})
    check_compatible(probe, Naive())
    check_compatible(None, MergeTA())
    check_compatible(RetentionProbe, Naive)  # the runner checks the registered classes
    with pytest.raises(ConfigError, match="strategy=my_merge does not"):
        check_compatible(RetentionProbe, MergeTA, "my_merge")
    with pytest.raises(ConfigError, match=r"probe=retention needs a strategy that trains by "
                       r"gradient steps \(capability 'train_step'\); strategy=merge_ta does "
                       r"not\. Use .*naive"):
        check_compatible(probe, MergeTA())
    stream = token_stream(vocab=16, length=8)
    probe = RetentionProbe(exposures=[1], stimuli=["random"], n_study=2, length=8,
                           study_after=1, retention_corpus="stream")
    probe.setup(stream, RunContext())
    with pytest.raises(ConfigError, match="capability 'train_step'.*FakeStrategy"):
        probe.after_batch(strategy=FakeStrategy(BigramLM(16)), task=stream[0])


class Recorder(FakeStrategy):
    """Records every ``train_step``; learns nothing."""

    capabilities = frozenset({"train_step"})
    batch_size = 4

    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def train_step(self, x, y, t, task):
        self.calls.append((x.clone(), y.clone(), t.clone(), task.index))


def test_massed_study_is_k_consecutive_train_steps_on_the_whole_set():
    """exposure=massed (the old protocol): k steps, each on the whole study set, with inputs,
    next-token targets and the task's id; nothing else of the strategy is used."""
    stream = token_stream(vocab=16, length=8)
    probe = RetentionProbe(exposures=[2], stimuli=["random"], n_study=3, length=8,
                           exposure="massed", retention_corpus="stream")
    probe.setup(stream, RunContext())
    strategy = Recorder(BigramLM(16))
    assert probe.study(strategy, stream[0], 2, torch.Generator()) == 2
    s = probe.sets["random"]["studied"]
    assert len(strategy.calls) == 2
    for x, y, t, index in strategy.calls:
        assert torch.equal(x, s[:, :-1]) and torch.equal(y, s[:, 1:])
        assert t.tolist() == [0, 0, 0] and index == 0


def test_epoch_study_shows_every_item_once_per_epoch_shuffled_in_batches():
    """exposure=epochs (Orhan): k passes over the study set (every kind together), each a new
    permutation cut into batches of study_batch_size, so items are spaced by the others."""
    stream = token_stream(vocab=50, length=8)
    probe = RetentionProbe(exposures=[3], stimuli=["random"], n_study=10, length=8,
                           study_batch_size=4, retention_corpus="stream")
    probe.setup(stream, RunContext())
    strategy = Recorder(BigramLM(50))
    assert probe.study(strategy, stream[0], 3, torch.Generator().manual_seed(0)) == 9
    s = probe.sets["random"]["studied"]
    assert [len(x) for x, *_ in strategy.calls] == [4, 4, 2] * 3
    key = [tuple(r.tolist()) for r in s[:, :-1]]
    epochs = []
    for e in range(3):
        rows = torch.cat([x for x, *_ in strategy.calls[3 * e:3 * e + 3]])
        epochs.append([key.index(tuple(r.tolist())) for r in rows])
        assert sorted(epochs[-1]) == list(range(10))  # each item exactly once per epoch
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    for x, y, *_ in strategy.calls:
        for xr, yr in zip(x, y):
            assert torch.equal(xr[1:], yr[:-1])  # targets are the next tokens
    # study_batch_size null: the strategy's batch size
    probe = RetentionProbe(exposures=[1], stimuli=["random"], n_study=10, length=8,
                           retention_corpus="stream")
    probe.setup(stream, RunContext())
    strategy = Recorder(BigramLM(50))
    probe.study(strategy, stream[0], 1, torch.Generator())
    assert [len(x) for x, *_ in strategy.calls] == [4, 4, 2]


def test_retention_cli_prints_the_tables(tmp_path, capsys):
    import json

    from cl_toolkit.retention import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    before = [point("studied", None, None, 0.75), point("control", None, None)]
    points = [point("studied", 0, 1, 0.75), point("control", 0, 1, 0.5)]
    (run_dir / "results.json").write_text(json.dumps(
        {"config": {"model": {"name": "gla_lm"}},
         "extras": {"retention": {"before": before, "points": points}}}))
    main([str(tmp_path), "-o", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert "| gla_lm | random | 1 | +25 | +25 | 1 |" in out
    assert "| gla_lm | random | 0 (control) | 50 | 50 | 1 |" in out
    assert (tmp_path / "plots" / "retention_gla_lm.png").exists()


# Issue 22, item 3: a probe that cannot measure anything at its settings is refused before
# training (or, under smoke=true, shrinks to fit); a bad schedule, a checkpoint without probe
# state and `python -m cl_toolkit.retention` on nothing to show are clear errors.

def test_planned_updates_count_what_the_loop_does():
    from cl_toolkit.probes import planned_updates
    from cl_toolkit.strategies.joint import Joint
    from cl_toolkit.strategies.replay import Replay

    stream = token_stream(vocab=16, length=8, n=64)
    probe = RetentionProbe(exposures=[1], stimuli=["random"], n_study=2, length=8,
                           study_after=10 ** 6, retention_corpus="stream")
    counted = []
    probe.after_batch = lambda **_: counted.append(1)  # count the updates, never study
    strategy = train_with_probe(probe, stream)  # 64 sequences, batches of 8, 2 epochs
    assert planned_updates(stream, strategy) == ([16], True) and len(counted) == 16
    assert planned_updates(stream, Replay(epochs=3, batch_size=10)) == ([21], True)
    # joint picks its own data (the union so far): the count is only a lower bound
    assert planned_updates(stream, Joint(epochs=1, batch_size=8)) == ([8], False)
    assert planned_updates(stream, FakeStrategy(None)) == (None, False)


def test_a_run_with_fewer_updates_than_the_probe_needs_is_refused_before_training(
        tmp_path, corpus):
    cfg = lm_cfg(path=str(corpus), files=["a", "b"], study_after=100)
    cfg["benchmark"]["path"] = str(corpus)
    trained = []
    from cl_toolkit.strategy import Hooks

    with pytest.raises(ConfigError) as info:
        run(cfg, tmp_path / "short", hooks=Hooks(after_batch=[lambda **_: trained.append(1)]))
    message = str(info.value)
    for words in ("probe.study_after=100", "only 12", "6 + 6 over 2 task(s)",
                  "strategy.batch_size=8", "strategy.epochs=1", "at most 12",
                  "probe.study_after=null"):
        assert words in message, message
    assert trained == [] and not (tmp_path / "short" / "results.json").exists()
    # the retention phase runs in the probe's own branches: a late schedule needs no updates
    cfg["probe"].update(study_after=12, schedule=[5, 10])
    assert run(cfg, tmp_path / "late")["extras"]["retention"]["study_update"] == 12


def test_under_smoke_the_probe_shrinks_to_the_run_and_measures(tmp_path, corpus):
    cfg = lm_cfg(path=str(corpus), files=["a", "b"], study_after=100, schedule=[0, 1, 50],
                 n_study=64, length=28)
    cfg["benchmark"]["path"] = str(corpus)
    curve = run({**cfg, "smoke": True}, tmp_path)["extras"]["retention"]
    assert curve["points"] and curve["study_update"] == curve["study_after"] >= 1
    assert curve["study_after"] <= curve["updates"] // 2 + 1
    assert "smoke=true" in curve["note"] and "probe.study_after=100" in curve["note"]
    assert "probe.schedule=[0, 1, 50]" in curve["note"] and "probe.n_study=64" in curve["note"]
    assert curve["n_study"] == 4 and curve["schedule"] == [0, 1]
    # the default protocol (1,000 retention updates, 64 pairs) shrinks to a few updates
    probe = RetentionProbe(stimuli=["random"])
    probe.smoke = True
    probe.setup(token_stream(vocab=256), RunContext())
    assert probe.n_study == 4 and probe.schedule == [0, 1, 3]


def test_a_strategy_whose_count_is_a_bound_is_not_refused_and_an_empty_curve_says_why(
        tmp_path, corpus):
    cfg = lm_cfg(path=str(corpus), files=["a", "b"], study_after=1000)
    cfg["benchmark"]["path"] = str(corpus)
    cfg["strategy"]["name"] = "joint"
    curve = run(cfg, tmp_path)["extras"]["retention"]
    assert curve["points"] == [] and curve["study_update"] is None
    assert curve["note"].startswith(f"never studied: the run made {curve['updates']} training")
    from cl_toolkit.renderers.retention import render

    md, page = render([{"config": cfg, "extras": {"retention": curve}}], tmp_path)
    assert "Note: never studied" in md and "never studied" in page


@pytest.mark.parametrize("schedule,words", [
    ([0, -3, 10], ["probe.schedule", ">= 0", "[-3]"]),
    ([10, 3, 1], ["increasing order", "[1, 3, 10]", "got [10, 3, 1]"]),
    ([0, 3, 3], ["each point once", "[0, 3]"]),
    ([], ["probe.schedule is empty", "null"]),
    ("often", ["list of update counts", "'often'"]),
])
def test_bad_schedules_are_refused(schedule, words):
    with pytest.raises(ConfigError) as info:
        RetentionProbe(schedule=schedule)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert RetentionProbe(schedule=[0, 2, 9]).schedule == [0, 2, 9]


@pytest.mark.parametrize("state", [None, {}, {"updates": 3}])
def test_resuming_without_probe_state_is_a_resume_error(state):
    from cl_toolkit.errors import ResumeError

    with pytest.raises(ResumeError, match="no retention probe state.*without probe=.*"
                                          "overwrite=true"):
        RetentionProbe().load_state_dict(state)


def test_resume_from_a_checkpoint_without_probe_state_names_the_fix(tmp_path, corpus):
    from cl_toolkit.errors import ResumeError

    cfg = lm_cfg(path=str(corpus), files=["a", "b"])
    cfg["benchmark"]["path"] = str(corpus)
    run_until(cfg, tmp_path, task_index=1, at_step=2)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    checkpoint["probe"] = None  # as a checkpoint written without the probe's state
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    with pytest.raises(ResumeError, match="no retention probe state"):
        run({**cfg, "resume": True}, tmp_path)


def retention_point(updates):
    return {"stimuli": "random", "k": 1, "updates": updates, "recognition": 0.5,
            "recall_exact": 0.0, "recall_token": 0.25, "loss_studied": 2.0, "loss_foil": 2.0}


@pytest.mark.parametrize("layout,words", [
    ("missing", ["nowhere", "does not exist"]),
    ("no_probe_runs", ["No retention probe results", "probe=retention"]),
    ("measured_nothing", ["measured nothing", "never studied", "probe.study_after"]),
    ("malformed", ["extras['retention'] is malformed", "lacks 'set', 'k'", "Rerun"]),
])
def test_retention_cli_refuses_nothing_to_show_in_one_line(tmp_path, capsys, layout, words):
    import json

    from cl_toolkit.retention import main

    run_dir = tmp_path / "runs" / "r0"
    run_dir.mkdir(parents=True)
    extras = {"no_probe_runs": {},
              "measured_nothing": {"retention": {
                  "before": [], "points": [], "updates": 12, "study_after": 100,
                  "study_update": None, "note": "never studied: the run made 12 training "
                                                "updates, fewer than probe.study_after=100"}},
              "malformed": {"retention": {"before": [], "points": [{"stimuli": "random"}]}}}
    (run_dir / "results.json").write_text(json.dumps(
        {"config": {"model": {"name": "gla_lm"}}, "extras": extras.get(layout, {})}))
    where = tmp_path / ("nowhere" if layout == "missing" else "runs")
    assert main([str(where)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "Traceback" not in out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    for word in words:
        assert word in lines[0], lines[0]


def test_retention_cli_exit_status_from_a_shell(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "cl_toolkit.retention", str(tmp_path / "no")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and \
        "Traceback" not in proc.stderr


# Issue 23: Orhan's protocol. An unstudied control set, a separate branch per k from one
# checkpoint (the run goes on exactly as without the probe), a retention corpus unlike the
# stimuli, ROUGE-L recall, word-like contrast stimuli, the study after the last task.

def test_lcs_and_rouge_l_match_hand_computed_values():
    from cl_toolkit.probes.retention_metrics import lcs_length, rouge_l

    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook pair (BCBA)
    assert lcs_length("", "abc") == 0 and lcs_length("abc", "abc") == 3
    assert lcs_length("abc", "xyz") == 0 and lcs_length("axbycz", "abc") == 3
    ref = ["the", "cat", "sat", "on", "the", "mat"]
    # candidate 4 words, LCS "the cat on mat" = 4: P = 1, R = 4/6, F = 2 * 2/3 / (5/3) = 0.8
    assert rouge_l(ref, ["the", "cat", "on", "mat"]) == pytest.approx(0.8)
    # LCS "the mat" = 2 of 3 and of 6: P = 2/3, R = 1/3, F = 2 * 2/9 / 1 = 4/9
    assert rouge_l(ref, ["mat", "the", "mat"]) == pytest.approx(4 / 9)
    assert rouge_l(ref, ref) == 1.0 and rouge_l(ref, ["dog"]) == 0.0 and rouge_l([], ref) == 0


def test_rouge_l_agrees_with_the_rouge_score_package_when_installed():
    scorer_module = pytest.importorskip("rouge_score.rouge_scorer")
    from cl_toolkit.probes.retention_metrics import rouge_l

    scorer = scorer_module.RougeScorer(["rougeL"])
    pairs = [("a b c d e f", "a c e g"), ("one two three", "three two one"),
             ("x y z", "x y z"), ("p q", "r s")]
    for ref, cand in pairs:
        assert rouge_l(ref.split(), cand.split()) == pytest.approx(
            scorer.score(ref, cand)["rougeL"].fmeasure)


def test_measure_reports_the_studied_and_the_control_set_against_a_known_loss_model():
    """Each set is judged against its own foils; the control is measured like the studied set."""
    stream = token_stream(vocab=50, length=8)
    probe = RetentionProbe(exposures=[1], stimuli=["random"], n_study=4, length=8,
                           retention_corpus="stream")
    probe.setup(stream, RunContext(seed=3))
    sets = probe.sets["random"]
    assert all(sets[p].shape == (4, 8) for p in ("studied", "foils", "control",
                                                  "control_foils"))
    # studied confident (3) vs foils (1) -> recognition 1; control 1 vs its foils 3, one tie
    # (1 vs 1) -> 0.125
    table = [(s, 3.0) for s in sets["studied"]] + [(f, 1.0) for f in sets["foils"]] + \
        [(c, 1.0) for c in sets["control"]] + [(f, 3.0) for f in sets["control_foils"][:3]] + \
        [(sets["control_foils"][3], 1.0)]
    strategy = FakeStrategy(KnownLossLM(50, table))
    assert len(strategy.model.table) == 16  # the rows are told apart by their first tokens
    rows = probe.measure(strategy, stream[0], 1, 7)
    assert [(r["set"], r["k"], r["updates"]) for r in rows] == [("studied", 1, 7),
                                                                 ("control", 1, 7)]
    studied, control = rows
    assert studied["recognition"] == 1.0 and control["recognition"] == pytest.approx(0.125)
    l3, l1 = (math.log(1 + 49 * math.exp(-c)) for c in (3.0, 1.0))
    assert studied["loss_studied"] == pytest.approx(l3)
    assert studied["loss_foil"] == pytest.approx(l1)
    assert control["loss_studied"] == pytest.approx(l1)
    assert control["loss_foil"] == pytest.approx((3 * l3 + l1) / 4)
    # the model continues every known sequence: full recall, ROUGE-L 1 (tokens as words)
    assert studied["recall_exact"] == studied["recall_token"] == studied["recall_rouge"] == 1.0


def fortunes_cfg(corpus, **probe):
    cfg = lm_cfg(path=str(corpus), files=["a", "b"], **probe)
    cfg["benchmark"]["path"] = str(corpus)
    return cfg


def final_state(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["strategy"]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for i, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][i][name]), (i, name)


@pytest.mark.parametrize("study_after", [3, None])
def test_the_run_continues_exactly_as_without_the_probe(tmp_path, corpus, study_after):
    """The oracle is the same run without the probe: same scores, same final model and
    optimizer state (checkpoints never hold a study branch), mid-run and after the last task,
    also with a study rate of its own."""
    cfg = fortunes_cfg(corpus, study_after=study_after, study_lr=0.05)
    plain = {k: v for k, v in cfg.items() if k != "probe"}
    without = run(plain, tmp_path / "without")
    with_ = run(cfg, tmp_path / "with")
    assert with_["extras"]["retention"]["study_update"] == (study_after or 12)
    assert with_["matrix"] == without["matrix"]
    assert_same_state(final_state(tmp_path / "with"), final_state(tmp_path / "without"))


def test_each_branch_starts_from_the_same_checkpoint(tmp_path, corpus):
    """The k = 1 branch measures the same whether it runs alone or after the k = 3 branch."""
    alone = run(fortunes_cfg(corpus, exposures=[1]), tmp_path / "a")["extras"]["retention"]
    after = run(fortunes_cfg(corpus, exposures=[3, 1]), tmp_path / "b")["extras"]["retention"]
    assert alone["before"] == after["before"]
    assert alone["points"] == [p for p in after["points"] if p["k"] == 1]
    k3 = [p for p in after["points"] if p["k"] == 3]
    assert k3 and k3 != [{**p, "k": 3} for p in alone["points"]]  # the study did something


def test_the_retention_phase_trains_on_python_source_through_train_step():
    """max(schedule) train_steps per branch after the study, on windows of the standard
    library's source (the oracle: the bytes of its *.py files), the same in every branch."""
    import sysconfig
    from pathlib import Path

    stream = token_stream(vocab=256, length=16)
    probe = RetentionProbe(exposures=[1, 2], stimuli=["random"], n_study=3, length=8,
                           schedule=[0, 2, 5], exposure="massed", study_after=1)
    probe.setup(stream, RunContext())
    strategy = Recorder(BigramLM(256))
    probe.after_batch(strategy=strategy, task=stream[0])
    studied = probe.sets["random"]["studied"][:, :-1]
    study = [i for i, (x, *_) in enumerate(strategy.calls) if torch.equal(x, studied)]
    assert study == [0, 6, 7]  # k = 1, then 5 retention steps; k = 2, then 5 again
    first, second = strategy.calls[1:6], strategy.calls[8:13]
    assert len(strategy.calls) == 13
    source = b"\n".join(f.read_bytes() for f in
                        sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")))
    for (x, y, t, _), (x2, *_) in zip(first, second):
        assert x.shape == (4, 16) and torch.equal(x, x2)  # strategy.batch_size x seq_len
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row, target in zip(x, y):
            assert bytes(row.tolist()) + bytes([int(target[-1])]) in source
    assert [(r["k"], r["updates"]) for r in probe.points][::2] == \
        [(1, 0), (1, 2), (1, 5), (2, 0), (2, 2), (2, 5)]
    probe = RetentionProbe(exposures=[1], stimuli=["random"], n_study=3, length=8,
                           schedule=[2], exposure="massed", study_after=1,
                           retention_batch_size=7)
    probe.setup(stream, RunContext())
    strategy = Recorder(BigramLM(256))
    probe.after_batch(strategy=strategy, task=stream[0])
    assert [len(x) for x, *_ in strategy.calls] == [3, 7, 7]


def test_the_stream_corpus_retains_on_the_current_tasks_training_data():
    stream = token_stream(vocab=16, length=8, n=20)
    probe = RetentionProbe(exposures=[1], stimuli=["random"], n_study=2, length=8,
                           schedule=[3], exposure="massed", retention_corpus="stream",
                           study_after=1)
    probe.setup(stream, RunContext())
    strategy = Recorder(BigramLM(16))
    probe.after_batch(strategy=strategy, task=stream[0])
    train = {tuple(r.tolist()) for r in stream[0].train.x}
    assert len(strategy.calls) == 4
    for x, *_ in strategy.calls[1:]:
        assert all(tuple(r.tolist()) in train for r in x)


def test_python_source_on_a_small_vocabulary_is_refused():
    probe = RetentionProbe(stimuli=["random"], n_study=2)
    with pytest.raises(ConfigError, match="python_source.*16 tokens.*retention_corpus=stream"):
        probe.setup(token_stream(vocab=16), RunContext())


@pytest.fixture
def long_corpus(tmp_path):
    """Quotations of 6-9 words, long enough for 32-byte stimuli, in two files."""
    root = tmp_path / "long"
    root.mkdir()
    words = ["apple", "river", "stone", "cloud", "mirror", "garden", "lantern", "winter",
             "copper", "meadow", "harbor", "violet"]
    for f, name in enumerate(["a", "b"]):
        quotes = [f"{name}{i} " + " ".join(words[(i * 7 + j * (f + 3)) % 12]
                                           for j in range(6 + i % 4)) for i in range(900)]
        (root / name).write_text("\n%\n".join(quotes) + "\n%\n")
    return root


def test_word_like_stimuli_are_what_they_claim(long_corpus):
    from cl_toolkit.benchmarks import fortunes

    probe = RetentionProbe(exposures=[1], stimuli=["fortunes", "scrambled", "random_words",
                                                   "random"], n_study=8, length=32,
                           path=str(long_corpus))
    probe.setup(token_stream(vocab=256), RunContext(seed=1))
    held_out = fortunes.probe_quotations(long_corpus, None)
    vocab = set(fortunes.vocabulary(long_corpus, None))
    text = {kind: [bytes(r.tolist()) for part in parts.values() for r in part]
            for kind, parts in probe.sets.items()}
    assert all(len(t) == 32 for rows in text.values() for t in rows)
    heads = {q[:32]: q for q in held_out}
    assert all(t in heads for t in text["fortunes"])
    sources = set()
    for t in text["scrambled"]:
        whole = t.split(b" ")[:-1]  # the last word may be cut
        match = [q for q in held_out if len(q) >= 32 and
                 all(whole.count(w) <= q.split(b" ").count(w) for w in whole)]
        assert match, t
        sources.add(t)
    # fortunes and scrambled draw from different quotations
    used = {heads[t] for t in text["fortunes"]}
    assert not any(sorted(q.split(b" ")) == sorted(t.split(b" ")) for q in used
                   for t in text["scrambled"])
    assert sum(t not in heads for t in text["scrambled"]) > 0.8 * len(text["scrambled"])
    for t in text["random_words"]:
        assert all(w in vocab for w in t.split(b" ")[:-1]), t
    assert len(set(text["random_words"])) == len(text["random_words"])
    alphabet = set(b"".join(text["fortunes"]))
    assert set(b"".join(text["random"])) <= set(b"".join(q[:32] for q in held_out
                                                         if len(q) >= 32))
    assert len(alphabet) > 5


def test_study_after_null_studies_the_trained_model_after_the_last_task(tmp_path, corpus):
    curve = run(fortunes_cfg(corpus, study_after=None), tmp_path)["extras"]["retention"]
    assert curve["study_update"] == curve["updates"] == 12 and curve["points"]
    assert curve["retention_corpus"] == "python_source" and "*.py" in curve["corpus"]


@pytest.mark.parametrize("key,value,words", [
    ("exposures", [0, 3], ["probe.exposures", "positive", "control"]),
    ("exposures", [1, 1], ["twice"]),
    ("exposure", "spaced", ["probe.exposure", "'spaced'", "epochs, massed"]),
    ("retention_corpus", "wiki", ["probe.retention_corpus", "python_source, stream"]),
    ("study_lr", 0, ["probe.study_lr", "> 0", "null"]),
    ("study_batch_size", 0, ["probe.study_batch_size", "positive integer", "null"]),
    ("retention_batch_size", 2.5, ["probe.retention_batch_size", "positive integer", "null"]),
    ("study_after", 0, ["probe.study_after", "null"]),
    ("n_study", 0, ["probe.n_study", "64"]),
    ("stimuli", ["words"], ["probe.stimuli", "random_words", "scrambled"]),
])
def test_bad_protocol_keys_are_refused_with_the_fix(key, value, words):
    with pytest.raises(ConfigError) as info:
        RetentionProbe(**{key: value})
    for word in words:
        assert word in str(info.value), str(info.value)


def test_study_lr_needs_an_optimizer_it_can_set():
    stream = token_stream(vocab=256, length=8)
    probe = RetentionProbe(exposures=[1], stimuli=["random"], n_study=2, length=8,
                           schedule=[0], study_lr=0.1, study_after=1)
    probe.setup(stream, RunContext())
    with pytest.raises(ConfigError, match="probe.study_lr=0.1 needs.*probe.study_lr=null"):
        probe.after_batch(strategy=Recorder(BigramLM(256)), task=stream[0])


def test_renderer_keeps_runs_of_different_settings_apart(tmp_path):
    """Same model, same seed, two probe settings: two rows, never one averaged "seed"."""
    from cl_toolkit.renderers.retention import render

    def result(lr, rec):
        before = [point("studied", None, None, 0.5), point("control", None, None, 0.5)]
        points = [point("studied", 0, rec=rec), point("control", 0, rec=0.5)]
        return {"config": {"seed": 0, "model": {"name": "gdn_lm"},
                           "probe": {"name": "retention", "study_lr": lr}},
                "extras": {"retention": {"before": before, "points": points}}}

    md, _ = render([result(0.001, 0.9), result(0.01, 0.6)], tmp_path)
    assert "| gdn_lm (probe.study_lr=0.001) | random | 3 | +0 | +40 | 1 |" in md
    assert "| gdn_lm (probe.study_lr=0.01) | random | 3 | +0 | +10 | 1 |" in md
