"""Recognition, recall and retention of few-shot memories (Orhan 2023,
https://arxiv.org/abs/2303.17557) as a probe on any language-model run (``probe=retention``).

How the study set enters training: once the run has made ``study_after`` updates, the probe
holds a study phase of ``max(exposures)`` rounds. Each round is one step of the strategy's own
objective (``strategy.train_step``: its optimizer, its loss plus the model's auxiliary loss,
through the run's trainer) over the study sets still to be shown: the set with ``k`` exposures
joins the last ``k`` rounds, so every set is seen exactly ``k`` times, all sets end together and
their retention intervals start at the same update. The strategy's batches are untouched (same
data order as without the probe); training then goes on with the stream's new sequences, which
is the interference. After 0, 1, 3, 10, 30, ... further updates the probe measures, for every
(stimulus kind, k), with the measures of `cl_toolkit.probes.retention_metrics`:

- recognition: two-alternative forced choice, the fraction of (studied, foil) pairs in which the
  studied sequence has the lower mean next-token loss (a tie counts half; chance is 0.5);
- recall: greedy continuation of each studied sequence's second half from its first half, as
  exact match (the whole half right) and token accuracy (the share of its positions right).

Stimuli: ``fortunes``, held-out quotations of the fortunes stream (its ``probe_sequences``: in no
fortunes training split), and ``random``, strings of the same length drawn uniformly from the
characters of those quotations (from the whole vocabulary when the run has no fortunes stimuli).
A foil is another sequence of the same kind, never shown.

What the probe uses of a run: the strategy's capability ``train_step`` (declared in
``requires``, checked by `cl_toolkit.probes.check_compatible` before the run starts),
``strategy.predict(ids, task)`` for logits and, for cached decoding when the model has it, the
language model's public ``step(input_ids, caches, t)`` (`SequenceLanguageModel.step`, reached as
``model.lm`` of a `TokenModel`), and ``strategy.epochs`` / ``strategy.batch_size`` to count the
run's updates before it trains (`RetentionProbe.check_run`: too few for ``study_after`` is
refused, or, under smoke=true, ``study_after`` shrinks to fit). Tables and plots:
`cl_toolkit.renderers.retention`.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Sequence

import torch

from ..errors import ConfigError, ResumeError
from ..strategy import RunContext
from ..stream import Task, TaskStream
from . import Probe, check_compatible, planned_updates
from .retention_metrics import on_log_schedule, recall, recognition, sequence_loss

STIMULI = ("fortunes", "random")


def _fortunes():
    """The fortunes stream builder's module (imported when a probe needs its stimuli)."""
    from cl_toolkit.benchmarks import fortunes

    return fortunes


def cached_step(model, task: Task, task_il: bool) -> Callable | None:
    """``step(ids, caches) -> (logits, caches)``: cached decoding through the language model's
    ``step(input_ids, caches, t)`` with the task ids `Strategy.predict` hands the model (the
    task's index in task-il, none otherwise); None when the model has no such method."""
    lm = getattr(model, "lm", None)
    if not callable(getattr(lm, "step", None)):
        return None
    with_ids = task_il and getattr(model, "uses_task_id", False)

    def step(ids, caches):
        t = torch.full((ids.shape[0],), task.index, dtype=torch.long, device=ids.device) \
            if with_ids else None
        return lm.step(ids, caches, t)
    return step


def _checked_schedule(schedule) -> list[int]:
    """``probe.schedule`` as a list of update counts: non-negative integers in increasing order,
    each once (refused otherwise, never silently sorted)."""
    entries = list(schedule) if isinstance(schedule, (list, tuple)) else None
    if entries is None or not all(isinstance(s, int) and not isinstance(s, bool)
                                  for s in entries):
        raise ConfigError(f"probe.schedule must be a list of update counts after the study, e.g. "
                          f"[0, 1, 3, 10] (or null for 0, 1, 3, 10, 30, ...); got {schedule!r}.")
    if not entries:
        raise ConfigError("probe.schedule is empty, so the probe would measure nothing; give the "
                          "updates after the study to measure at, e.g. [0, 1, 3, 10], or null "
                          "for 0, 1, 3, 10, 30, ...")
    if min(entries) < 0:
        raise ConfigError(f"probe.schedule counts updates after the study and must be >= 0; got "
                          f"{entries} (negative: {[s for s in entries if s < 0]}).")
    if any(b <= a for a, b in itertools.pairwise(entries)):
        raise ConfigError(f"probe.schedule must be in increasing order, each point once, e.g. "
                          f"{sorted(set(entries))}; got {entries}.")
    return entries


class RetentionProbe(Probe):
    """The retention probe; settings as in conf/probe/retention.yaml."""

    key = "retention"
    requires = frozenset({"train_step"})

    def __init__(self, exposures: Sequence[int] = (1, 3, 10),
                 stimuli: Sequence[str] = STIMULI, n_study: int = 8, length: int = 32,
                 study_after: int = 100, schedule: Sequence[int] | None = None,
                 path: str | None = None, files: Sequence[str] | None = None):
        self.exposures = [int(k) for k in exposures]
        self.stimuli = list(stimuli)
        if not self.exposures or min(self.exposures) < 1:
            raise ConfigError(f"probe.exposures must be positive counts, e.g. [1, 3, 10]; got "
                              f"{list(exposures)}.")
        for kind in self.stimuli:
            if kind not in STIMULI:
                raise ConfigError(f"Unknown probe.stimuli entry {kind!r}; use any of "
                                  f"{', '.join(STIMULI)}.")
        if n_study < 1 or length < 4:
            raise ConfigError(f"probe.n_study must be >= 1 and probe.length >= 4; got n_study="
                              f"{n_study}, length={length}.")
        if study_after < 1:
            raise ConfigError(f"probe.study_after counts training updates before the study "
                              f"phase and must be >= 1; got {study_after}.")
        self.n_study, self.length, self.study_after = int(n_study), int(length), int(study_after)
        self.schedule = None if schedule is None else _checked_schedule(schedule)
        self.path = path
        self.files = None if files is None else list(files)
        self.task_il = False
        self.num_tasks = 0
        self.note: str | None = None  # what the probe changed or could not do, for the report
        self.updates, self.study_update, self.probe_s = 0, None, 0.0
        self.before: list[dict] = []
        self.points: list[dict] = []

    def _fortunes_pool(self) -> torch.Tensor:
        """Held-out quotations of ``length`` bytes; None path / files: the stream's defaults."""
        where = {k: v for k, v in (("path", self.path), ("files", self.files)) if v is not None}
        return _fortunes().probe_sequences(self.length, **where)

    def setup(self, stream: TaskStream, ctx: RunContext) -> None:
        vocab = stream.vocab_size
        if vocab is None:
            raise ConfigError(
                f"probe=retention needs a language-model run, but the stream {stream.name!r} is "
                "not a token stream (it has no vocab_size). Use a token benchmark "
                "with an *_lm model, e.g. benchmark=fortunes model=mom_lm, or drop probe=.")
        self.task_il = stream.task_il
        self.num_tasks = len(stream)
        g = torch.Generator().manual_seed(int(ctx.seed) + 7919)
        need, sets = len(self.exposures) * self.n_study, []
        pool = None
        if "fortunes" in self.stimuli:
            if vocab < _fortunes().VOCAB_SIZE:
                raise ConfigError(
                    f"probe.stimuli has 'fortunes' (byte tokens 0-255) but the run's vocabulary "
                    f"has {vocab} tokens; use probe.stimuli=[random] or a byte-level stream such "
                    "as benchmark=fortunes.")
            pool = self._fortunes_pool()
            if len(pool) < 2 * need:
                raise ConfigError(
                    f"The fortunes probe pool holds {len(pool)} held-out quotations of "
                    f"{self.length} bytes, fewer than the {2 * need} needed (studied + foils for "
                    f"{len(self.exposures)} exposure counts x n_study={self.n_study}); lower "
                    "probe.n_study or probe.length, or add probe.files.")
        alphabet = torch.arange(vocab) if pool is None else torch.unique(pool)
        for kind in self.stimuli:
            if kind == "fortunes":
                rows = pool[torch.randperm(len(pool), generator=g)[:2 * need]]
            else:
                rows = alphabet[torch.randint(len(alphabet), (2 * need, self.length),
                                              generator=g)]
            rows = rows.to(ctx.device)
            for i, k in enumerate(self.exposures):
                studied = rows[i * self.n_study:(i + 1) * self.n_study]
                foils = rows[need + i * self.n_study:need + (i + 1) * self.n_study]
                sets.append((kind, k, studied, foils))
        self.sets = sets

    def check_run(self, stream: TaskStream, strategy) -> None:
        """Refuse a run with fewer training updates than the probe needs (``study_after``, plus
        the first point of ``schedule``), counted from the strategy's epochs and batch size
        (`cl_toolkit.probes.planned_updates`). Under smoke=true the probe shrinks instead:
        ``study_after`` to half the run's updates (at least 1), ``schedule`` to its points that
        fit (``[0]`` if none), noted in its results. Where the count is only a lower bound
        (a strategy that picks its own training data, e.g. joint) nothing is refused; a probe
        that never studied says so in its results (``note``)."""
        per_task, exact = planned_updates(stream, strategy)
        if per_task is None or not exact:
            return
        total = sum(per_task)
        first = 0 if self.schedule is None else self.schedule[0]
        if total >= self.study_after + first:
            return
        if self.smoke:
            old = (self.study_after, self.schedule)
            self.study_after = max(1, total // 2)
            if self.schedule is not None:
                self.schedule = [s for s in self.schedule if s <= total - self.study_after] or [0]
            self.note = (f"smoke=true: the run makes {total} training updates, so the probe "
                         f"studied after {self.study_after} (probe.study_after={old[0]})" +
                         (f" and measured at {self.schedule} (probe.schedule={old[1]})"
                          if old[1] is not None else ""))
            return
        counts = " + ".join(map(str, per_task))
        what = (f"probe.study_after={self.study_after} training updates"
                + (f" plus the first point of probe.schedule, {first} updates after the study"
                   if first else ""))
        raise ConfigError(
            f"probe=retention would measure nothing on this run: it needs {what}, but the run "
            f"makes only {total} ({counts} over {len(per_task)} task(s): ceil(train size / "
            f"strategy.batch_size={strategy.batch_size}) x strategy.epochs={strategy.epochs} "
            f"per task). Lower probe.study_after to at most {max(total - first, 1)}"
            + (" (or start probe.schedule earlier)" if first else "")
            + ", or train longer (strategy.epochs, a smaller strategy.batch_size, more "
            "training data).")

    def hooks(self) -> dict:
        return {"after_batch": self.after_batch, "after_task": self.after_task}

    def after_task(self, task: Task, **_) -> None:
        """After the last task: say in the results why the curve is empty, if it is."""
        if task.index != self.num_tasks - 1 or self.points:
            return
        if self.study_update is None:
            self.note = (f"never studied: the run made {self.updates} training updates, fewer "
                         f"than probe.study_after={self.study_after}; lower it or train longer")
        else:
            self.note = (f"studied at update {self.study_update} but the run ended "
                         f"{self.updates - self.study_update} updates later, before the first "
                         f"point of probe.schedule={self.schedule}")

    def due(self, since_study: int) -> bool:
        if self.schedule is None:
            return on_log_schedule(since_study)
        return since_study in self.schedule

    def after_batch(self, strategy, task: Task, **_) -> None:
        self.updates += 1
        if self.study_update is None and self.updates < self.study_after:
            return
        t0 = time.perf_counter()
        if self.study_update is None:
            self.before = self.measure(strategy, task, None)
            self.study(strategy, task)
            self.study_update = self.updates
        since = self.updates - self.study_update
        if self.due(since):
            self.points += self.measure(strategy, task, since)
        self.probe_s += time.perf_counter() - t0

    def study(self, strategy, task: Task) -> None:
        """``max(exposures)`` steps of the strategy's objective; set k joins the last k."""
        check_compatible(self, strategy)
        top = max(self.exposures)
        for r in range(top):
            x = torch.cat([s for _, k, s, _ in self.sets if r >= top - k])
            t = torch.full((x.shape[0],), task.index, dtype=torch.long, device=x.device)
            strategy.train_step(x[:, :-1], x[:, 1:], t, task)

    @torch.no_grad()
    def measure(self, strategy, task: Task, since: int | None) -> list[dict]:
        model = strategy.model
        was_training = model.training
        model.eval()

        def predict(ids: torch.Tensor) -> torch.Tensor:
            out = strategy.predict(ids, task)
            out = out[0] if isinstance(out, tuple) else out
            if out.dim() != 3 or out.shape[:2] != ids.shape:
                raise ConfigError(
                    f"probe=retention needs a language model (ids [B, T] -> logits [B, T, V]); "
                    f"{type(model).__name__} returned shape {list(out.shape)} for ids "
                    f"{list(ids.shape)}. Use an *_lm model, e.g. model=mom_lm.")
            return out

        studied = torch.cat([s for _, _, s, _ in self.sets])
        foils = torch.cat([f for _, _, _, f in self.sets])
        logits = predict(torch.cat([studied, foils])[:, :-1])
        n = len(studied)
        loss = sequence_loss(logits, torch.cat([studied, foils]))
        exact, acc = recall(predict, studied, logits[:n], cached_step(model, task, self.task_il))
        rows, m = [], self.n_study
        for i, (kind, k, _, _) in enumerate(self.sets):
            sl = slice(i * m, (i + 1) * m)
            ls, lf = loss[:n][sl], loss[n:][sl]
            rows.append({"stimuli": kind, "k": k, "updates": since,
                         "recognition": recognition(ls, lf),
                         "recall_exact": float(exact[sl].float().mean()),
                         "recall_token": float(acc[sl].mean()),
                         "loss_studied": float(ls.mean()), "loss_foil": float(lf.mean())})
        model.train(was_training)
        return rows

    def results(self) -> dict:
        return {"paper": "https://arxiv.org/abs/2303.17557", "exposures": self.exposures,
                "stimuli": self.stimuli, "n_study": self.n_study, "length": self.length,
                "study_after": self.study_after, "study_update": self.study_update,
                "updates": self.updates, "probe_s": self.probe_s,
                "before": list(self.before), "points": list(self.points),
                **({"note": self.note} if self.note else {})}

    def state_dict(self) -> dict:
        return {"updates": self.updates, "study_update": self.study_update,
                "probe_s": self.probe_s, "before": list(self.before), "points": list(self.points)}

    def load_state_dict(self, state: dict | None) -> None:
        keys = ("updates", "study_update", "probe_s", "before", "points")
        if not isinstance(state, dict) or not all(k in state for k in keys):
            raise ResumeError(
                "The run's checkpoint holds no retention probe state (it was written by a run "
                "without probe=retention, or by an older cl_toolkit), so the probe's curve "
                "cannot continue where the run stopped. Resume it as it was started (without "
                "probe=), or pass overwrite=true instead of resume=true to start the run over "
                "with the probe.")
        self.updates, self.study_update = state["updates"], state["study_update"]
        self.probe_s, self.before, self.points = state["probe_s"], state["before"], state["points"]
