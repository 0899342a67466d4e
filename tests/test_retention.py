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
from cl_toolkit.probes.retention_metrics import (log_spaced, on_log_schedule, recall,
                                                 recognition, sequence_loss)
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
    assert [n for n in range(1001) if on_log_schedule(n)] == [0, 1, 3, 10, 30, 100, 300, 1000]


def test_measure_reports_each_set_against_a_known_loss_model():
    stream = token_stream(vocab=50, length=8)
    probe = RetentionProbe(exposures=[1, 3], stimuli=["random"], n_study=4, length=8)
    probe.setup(stream, RunContext(seed=3))
    (_, k1, s1, f1), (_, k3, s3, f3) = probe.sets
    assert (k1, k3) == (1, 3) and s1.shape == (4, 8)
    # k=1: studied confident (3) vs foils (1) -> 1.0; k=3: studied 1, foils 3 -> 0.0 except
    # one tie -> 0.125.
    table = [(s, 3.0) for s in s1] + [(f, 1.0) for f in f1] + [(s, 1.0) for s in s3] + \
        [(f, 3.0) for f in f3[:3]] + [(f3[3], 1.0)]
    strategy = FakeStrategy(KnownLossLM(50, table))
    assert len(strategy.model.table) == 16  # the rows are told apart by their first tokens
    rows = probe.measure(strategy, stream[0], 7)
    assert [(r["k"], r["updates"]) for r in rows] == [(1, 7), (3, 7)]
    assert rows[0]["recognition"] == 1.0 and rows[1]["recognition"] == pytest.approx(0.125)
    l1, l3 = (math.log(1 + 49 * math.exp(-c)) for c in (3.0, 1.0))
    assert rows[0]["loss_studied"] == pytest.approx(l1) and rows[0]["loss_foil"] == \
        pytest.approx(l3)
    assert rows[0]["recall_exact"] == 1.0 and rows[0]["recall_token"] == 1.0


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


def test_study_shows_each_set_k_times_ending_together_and_makes_it_recognised():
    stream = token_stream(vocab=16, length=8, n=64)
    probe = RetentionProbe(exposures=[1, 3], stimuli=["random"], n_study=6, length=8,
                           study_after=4, schedule=[0, 2, 5])
    seen = []
    original_loss = Naive.loss

    def recording_loss(self, x, y, t, task):
        seen.append(x.clone())
        return original_loss(self, x, y, t, task)

    Naive.loss = recording_loss
    try:
        strategy = train_with_probe(probe, stream)
    finally:
        Naive.loss = original_loss
    (_, _, s1, _), (_, _, s3, _) = probe.sets
    # 16 training batches (2 epochs of 8) plus 3 study rounds: [s3], [s3], [s1; s3]
    study = [x for x in seen if x.shape[0] != 8]
    assert len(seen) == 16 + 3 and len(study) == 3
    assert torch.equal(study[0], s3[:, :-1]) and torch.equal(study[1], s3[:, :-1])
    assert torch.equal(study[2], torch.cat([s1, s3])[:, :-1])
    assert probe.study_update == 4 and probe.updates == 16
    assert [r["updates"] for r in probe.points] == [0, 0, 2, 2, 5, 5]
    before = {r["k"]: r for r in probe.before}
    after = {r["k"]: r for r in probe.points if r["updates"] == 0}
    # The study lowers the loss of what was studied, not of the foils, more so with k=3.
    assert after[1]["loss_studied"] < before[1]["loss_studied"] - 0.02
    assert after[3]["loss_studied"] < before[3]["loss_studied"] - 0.5
    assert after[1]["loss_foil"] > before[1]["loss_foil"] - 0.02
    assert after[3]["recognition"] == 1.0
    assert after[3]["loss_foil"] - after[3]["loss_studied"] > \
        after[1]["loss_foil"] - after[1]["loss_studied"]
    assert strategy.model.training is False  # learn() ended in eval mode as usual


def lm_cfg(**probe):
    return {"seed": 0, "threads": 1,
            "benchmark": {"name": "fortunes", "files": ["a", "b"], "seq_len": 16,
                          "max_train": 48, "max_test": 8},
            "model": {"name": "gdn_lm", "hidden_size": 16, "num_layers": 1, "num_heads": 1},
            "strategy": {"name": "naive", "epochs": 1, "batch_size": 8, "lr": 0.01,
                         "optimizer": "adam"},
            "probe": {"name": "retention", "study_after": 2, "n_study": 2, "length": 12,
                      "exposures": [1, 3], **probe}}


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
    with pytest.raises(ConfigError, match="probe.exposure.*exposures"):
        run({**digits, "probe": {"name": "retention", "exposure": [1]}}, tmp_path / "b")
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
    assert sorted({r["updates"] for r in curve["points"]}) == [0, 1, 3, 10]
    assert {(r["stimuli"], r["k"]) for r in curve["points"]} == \
        {(s, k) for s in ("fortunes", "random") for k in (1, 3)}

    run_until(cfg, tmp_path / "cut", task_index=1, at_step=2)
    resumed = run({**cfg, "resume": True}, tmp_path / "cut")
    keep = ("points", "before", "updates", "study_update")
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


def test_renderer_averages_runs_and_writes_a_plot(tmp_path):
    from cl_toolkit.renderers.retention import render

    def point(updates, rec, gap):
        return {"stimuli": "random", "k": 3, "updates": updates, "recognition": rec,
                "recall_exact": 0.0, "recall_token": 0.5, "loss_studied": 2.0,
                "loss_foil": 2.0 + gap}

    runs = [{"config": {"model": {"name": "gdn_lm"}},
             "extras": {"retention": {"before": [point(None, 0.5, 0.1)],
                                      "points": [point(0, r0, 0.5), point(10, 0.5, 0.2)]}}}
            for r0 in (1.0, 0.75)]
    md, html = render(runs + [{"config": {}, "metrics": {}}], tmp_path)
    assert "| gdn_lm | random | 3 | 50 | 88 | 50 | 2 |" in md  # recognition: (100 + 75) / 2
    assert "| gdn_lm | random | 3 |  | +0.40 | +0.10 | 2 |" in md  # gain: 0.5 - 0.1, 0.2 - 0.1
    assert (tmp_path / "retention_gdn_lm.png").stat().st_size > 1000
    assert "data:image/png;base64," in html
    assert render([{"config": {}}], tmp_path) == ("", "")


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
                           study_after=1)
    probe.setup(stream, RunContext())
    with pytest.raises(ConfigError, match="capability 'train_step'.*FakeStrategy"):
        probe.after_batch(strategy=FakeStrategy(BigramLM(16)), task=stream[0])


def test_study_rounds_are_the_strategys_train_steps():
    """Each study round is one ``train_step`` call with inputs, next-token targets and the
    task's id; nothing else of the strategy is used."""
    calls = []

    class Recorder(FakeStrategy):
        capabilities = frozenset({"train_step"})

        def train_step(self, x, y, t, task):
            calls.append((x, y, t, task.index))

    stream = token_stream(vocab=16, length=8)
    probe = RetentionProbe(exposures=[2], stimuli=["random"], n_study=3, length=8)
    probe.setup(stream, RunContext())
    probe.study(Recorder(BigramLM(16)), stream[0])
    (_, _, s, _), = probe.sets
    assert len(calls) == 2
    for x, y, t, index in calls:
        assert torch.equal(x, s[:, :-1]) and torch.equal(y, s[:, 1:])
        assert t.tolist() == [0, 0, 0] and index == 0


def test_retention_cli_prints_the_tables(tmp_path, capsys):
    import json

    from cl_toolkit.retention import main

    point = {"stimuli": "random", "k": 1, "updates": None, "recognition": 0.5,
             "recall_exact": 0.0, "recall_token": 0.25, "loss_studied": 2.0, "loss_foil": 2.0}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(
        {"config": {"model": {"name": "gla_lm"}},
         "extras": {"retention": {"before": [point], "points": [{**point, "updates": 0}]}}}))
    main([str(tmp_path), "-o", str(tmp_path / "plots")])
    assert "| gla_lm | random | 1 | 50 | 50 | 1 |" in capsys.readouterr().out
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
                           study_after=10 ** 6)
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
                  "strategy.batch_size=8", "strategy.epochs=1", "at most 12"):
        assert words in message, message
    assert trained == [] and not (tmp_path / "short" / "results.json").exists()
    # the first point of an explicit schedule counts too
    cfg["probe"].update(study_after=10, schedule=[5, 10])
    with pytest.raises(ConfigError, match="first point of probe.schedule, 5 updates after"):
        run(cfg, tmp_path / "late")


def test_under_smoke_the_probe_shrinks_to_the_run_and_measures(tmp_path, corpus):
    cfg = lm_cfg(path=str(corpus), files=["a", "b"], study_after=100, schedule=[0, 1, 50])
    cfg["benchmark"]["path"] = str(corpus)
    curve = run({**cfg, "smoke": True}, tmp_path)["extras"]["retention"]
    assert curve["points"] and curve["study_update"] == curve["study_after"] >= 1
    assert curve["study_after"] <= curve["updates"] // 2 + 1
    assert "smoke=true" in curve["note"] and "probe.study_after=100" in curve["note"]
    assert "probe.schedule=[0, 1, 50]" in curve["note"]


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
    ("malformed", ["extras['retention'] is malformed", "lacks 'k'"]),
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
