"""Recognition, recall and retention of few-shot memories (Orhan 2023,
https://arxiv.org/abs/2303.17557) as a probe on any language-model run (``probe=retention``).

The protocol. At one point of the run (``study_after``: after that many training updates, or
null: after the run's last task, so the study starts from the trained model) the probe draws,
per stimulus kind, a study set of ``n_study`` sequences of ``length`` tokens, as many foils, and
an unstudied control set of the same kind with foils of its own. Then, for every exposure count
``k`` in ``exposures``, it runs a separate branch from that same checkpoint:

1. snapshot the model, the strategy's optimizers (its public ``torch.optim.Optimizer``
   attributes), the random number generators and the trainer's loss scaler;
2. study: ``exposure=epochs`` (the paper's): ``k`` epochs over the study set (the studied
   sequences of every kind together, shuffled each epoch, in batches of ``study_batch_size``,
   so each item is spaced by the others); ``exposure=massed``: ``k`` consecutive steps on the
   whole study set as one batch. Every step is the strategy's own ``train_step`` (its
   objective, its optimizer, the run's trainer) at ``study_lr`` (null: the strategy's);
3. retention: ``max(schedule)`` further ``train_step`` updates on the retention corpus
   (``python_source``: byte windows of Python's standard-library source, text unlike the
   stimuli; ``stream``: windows of the current task's training data; batches of
   ``retention_batch_size``, null: the strategy's), at ``study_lr`` too, the same batches in
   every branch, measuring after each point of ``schedule`` (0: straight after the study);
4. restore the snapshot, so the run continues exactly as it would without the probe (its
   checkpoints never hold a branch).

Each measurement gives, for every stimulus kind and for the studied and the control set, with
the measures of `cl_toolkit.probes.retention_metrics`:

- recognition: two-alternative forced choice, the fraction of (set member, its foil) pairs in
  which the member has the lower mean next-token loss (a tie counts half; chance is 0.5);
- recall: greedy continuation of each sequence's second half from its first half, as exact
  match (the whole half right), token accuracy (the share of its positions right) and ROUGE-L
  (F-measure of the longest common subsequence of words of the decoded text, cue included,
  against the whole reference; a byte-level run splits its bytes at whitespace, any other run
  counts each token as a word);
- the mean losses of the set and of its foils.

The control set is measured at every point exactly like the studied set, in the same branch,
so every effect is read against it (`cl_toolkit.renderers.retention`).

Stimuli: ``fortunes`` (held-out quotations of the fortunes corpus, in no fortunes stream's
training or test split), ``scrambled`` (other held-out quotations with their words shuffled),
``random_words`` (words drawn at random from the training quotations' vocabulary, joined by
spaces) and ``random`` (characters drawn uniformly from those of the held-out quotations; from
the whole vocabulary when the run has no fortunes stimuli), all cut to ``length`` bytes.

What the probe uses of a run: the strategy's capability ``train_step`` (declared in
``requires``, checked before the run starts), ``strategy.predict(ids, task)`` for logits and,
for cached decoding when the model has it, the language model's public ``step(input_ids,
caches, t)`` (reached as ``model.lm`` of a `TokenModel`), ``strategy.model`` and the strategy's
public optimizer attributes to snapshot and restore a branch, and ``strategy.epochs`` /
``strategy.batch_size`` to count the run's updates before it trains (`RetentionProbe.check_run`)
and as the default batch size.
"""
from __future__ import annotations

import copy
import itertools
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import ConfigError, ResumeError
from ..strategy import RunContext
from ..stream import Task, TaskStream
from . import Probe, check_compatible, planned_updates
from .retention_metrics import (completions, log_spaced, recall_scores, recognition, rouge_l,
                                sequence_loss)

STIMULI = ("fortunes", "random", "random_words", "scrambled")
EXPOSURE = ("epochs", "massed")
CORPORA = ("python_source", "stream")
SETS = ("studied", "control")
SMOKE_N_STUDY, SMOKE_LAST_POINT = 4, 3
PYTHON_SOURCE_BYTES = 4_000_000  # read at most this much of the standard library's source


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


def python_source(limit: int = PYTHON_SOURCE_BYTES) -> tuple[torch.Tensor, str]:
    """The bytes of the top-level ``*.py`` files of Python's standard library (sorted by name,
    joined by newlines, at most ``limit``) as token ids ``[N]``, and where they came from."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for f in sorted(root.glob("*.py")):
        if size >= limit:
            break
        data = f.read_bytes()
        chunks.append(data)
        size += len(data) + 1
    raw = b"\n".join(chunks)[:limit]
    if len(raw) < 1000:
        raise ConfigError(f"probe.retention_corpus=python_source found only {len(raw)} bytes of "
                          f"*.py files in {root}; use probe.retention_corpus=stream.")
    where = f"{len(raw)} bytes of {len(chunks)} *.py files of {root} (Python " \
            f"{sys.version.split()[0]})"
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long(), where


def _checked_schedule(schedule) -> list[int]:
    """``probe.schedule`` as a list of update counts: non-negative integers in increasing order,
    each once (refused otherwise, never silently sorted)."""
    entries = list(schedule) if isinstance(schedule, (list, tuple)) else None
    if entries is None or not all(isinstance(s, int) and not isinstance(s, bool)
                                  for s in entries):
        raise ConfigError(f"probe.schedule must be a list of update counts after the study, e.g. "
                          f"[0, 1, 3, 10] (or null for 0, 1, 3, 10, ..., 1000); got "
                          f"{schedule!r}.")
    if not entries:
        raise ConfigError("probe.schedule is empty, so the probe would measure nothing; give the "
                          "updates after the study to measure at, e.g. [0, 1, 3, 10], or null "
                          "for 0, 1, 3, 10, ..., 1000")
    if min(entries) < 0:
        raise ConfigError(f"probe.schedule counts updates after the study and must be >= 0; got "
                          f"{entries} (negative: {[s for s in entries if s < 0]}).")
    if any(b <= a for a, b in itertools.pairwise(entries)):
        raise ConfigError(f"probe.schedule must be in increasing order, each point once, e.g. "
                          f"{sorted(set(entries))}; got {entries}.")
    return entries


def _positive_int(key: str, value, example: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"probe.{key} must be a positive integer{' or null' * allow_none}, "
                          f"e.g. probe.{key}={example}; got {value!r}.")


def _one_of(key: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"Unknown probe.{key} {value!r}; use one of {', '.join(choices)}.")


class RetentionProbe(Probe):
    """The retention probe; settings as in conf/probe/retention.yaml."""

    key = "retention"
    requires = frozenset({"train_step"})

    def __init__(self, exposures: Sequence[int] = (1, 3, 10),
                 stimuli: Sequence[str] = ("fortunes", "random"), n_study: int = 64,
                 length: int = 32, study_after: int | None = None, exposure: str = "epochs",
                 study_lr: float | None = None, study_batch_size: int | None = None,
                 retention_corpus: str = "python_source",
                 retention_batch_size: int | None = None,
                 schedule: Sequence[int] | None = None,
                 path: str | None = None, files: Sequence[str] | None = None):
        if not isinstance(exposures, (list, tuple)) or not exposures or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in exposures):
            raise ConfigError(f"probe.exposures must be positive counts, e.g. [1, 3, 10] (the "
                              f"unstudied control, k = 0, is always measured); got "
                              f"{exposures!r}.")
        if len(set(exposures)) != len(exposures):
            raise ConfigError(f"probe.exposures lists a count twice: {list(exposures)}; give "
                              f"each once, e.g. {sorted(set(exposures))}.")
        self.exposures = [int(k) for k in exposures]
        if not isinstance(stimuli, (list, tuple)):
            raise ConfigError(f"probe.stimuli must be a list of stimulus kinds, e.g. "
                              f"[fortunes, random]; got {stimuli!r}. Kinds: {', '.join(STIMULI)}.")
        if files is not None and not isinstance(files, (list, tuple)):
            raise ConfigError(f"probe.files must be a list of fortunes file names, e.g. "
                              f"[wisdom, science], or null; got {files!r}.")
        self.stimuli = list(stimuli)
        if not self.stimuli:
            raise ConfigError(f"probe.stimuli is empty; use any of {', '.join(STIMULI)}.")
        for kind in self.stimuli:
            if kind not in STIMULI:
                raise ConfigError(f"Unknown probe.stimuli entry {kind!r}; use any of "
                                  f"{', '.join(STIMULI)}.")
        if len(set(self.stimuli)) != len(self.stimuli):
            raise ConfigError(f"probe.stimuli lists a kind twice: {self.stimuli}.")
        _positive_int("n_study", n_study, "64")
        if not isinstance(length, int) or isinstance(length, bool) or length < 4:
            raise ConfigError(f"probe.length must be an integer >= 4 (tokens per stimulus), e.g. "
                              f"probe.length=32; got {length!r}.")
        _positive_int("study_after", study_after, "100 (or null: after the last task)",
                      allow_none=True)
        _one_of("exposure", exposure, EXPOSURE)
        _one_of("retention_corpus", retention_corpus, CORPORA)
        if study_lr is not None and (isinstance(study_lr, bool) or not isinstance(
                study_lr, (int, float)) or not study_lr > 0):
            raise ConfigError(f"probe.study_lr must be a learning rate > 0 or null (the "
                              f"strategy's), e.g. probe.study_lr=0.001; got {study_lr!r}.")
        _positive_int("study_batch_size", study_batch_size, "32", allow_none=True)
        _positive_int("retention_batch_size", retention_batch_size, "32", allow_none=True)
        self.n_study, self.length, self.study_after = int(n_study), int(length), study_after
        self.exposure, self.retention_corpus = exposure, retention_corpus
        self.study_lr = None if study_lr is None else float(study_lr)
        self.study_batch_size = study_batch_size
        self.retention_batch_size = retention_batch_size
        self.schedule = log_spaced(1000) if schedule is None else _checked_schedule(schedule)
        self.path = path
        self.files = None if files is None else list(files)
        self.task_il = False
        self.num_tasks = 0
        self.notes: list[str] = []  # what the probe changed or could not do, for the report
        self.updates, self.study_update, self.probe_s = 0, None, 0.0
        self.before: list[dict] = []
        self.points: list[dict] = []
        self.ctx: RunContext | None = None
        self.corpus_where: str | None = None

    # -- stimuli ---------------------------------------------------------------------------

    def _where(self) -> dict:
        return {"path": self.path or _fortunes().DEFAULT_PATH, "files": self.files}

    def _stimulus_rows(self, kind: str, count: int, g: torch.Generator, quotes: list[bytes],
                       alphabet: torch.Tensor) -> torch.Tensor:
        """``count`` sequences ``[count, length]`` of one kind; ``quotes`` are this kind's own
        held-out quotations (fortunes and scrambled draw from disjoint halves)."""
        L = self.length
        if kind == "random":
            return alphabet[torch.randint(len(alphabet), (count, L), generator=g)]
        encode = _fortunes().encode
        if kind == "fortunes":
            return torch.stack([encode(q[:L]) for q in quotes[:count]])
        if kind == "scrambled":
            rows = []
            for q in quotes[:count]:
                words = q.split(b" ")
                order = torch.randperm(len(words), generator=g).tolist()
                rows.append(encode(b" ".join(words[i] for i in order)[:L]))
            return torch.stack(rows)
        words = self.vocabulary
        rows = []
        for _ in range(count):
            text = b""
            while len(text) < L:
                text += (b" " if text else b"") + words[int(torch.randint(len(words), (1,),
                                                                          generator=g))]
            rows.append(encode(text[:L]))
        return torch.stack(rows)

    def _draw_stimuli(self, vocab: int, g: torch.Generator) -> dict:
        """``{kind: {studied, foils, control, control_foils}}``, each ``[n_study, length]``."""
        n, L = self.n_study, self.length
        per_kind = 4 * n
        text_kinds = [k for k in self.stimuli if k != "random"]
        quotes: list[bytes] = []
        alphabet = torch.arange(vocab)
        if text_kinds:
            if vocab < _fortunes().VOCAB_SIZE:
                raise ConfigError(
                    f"probe.stimuli has {', '.join(text_kinds)} (byte tokens 0-255) but the "
                    f"run's vocabulary has {vocab} tokens; use probe.stimuli=[random] or a "
                    "byte-level stream such as benchmark=fortunes.")
            where = self._where()
            heads = {}  # one quotation per distinct first L bytes (no studied copy of a foil)
            for q in _fortunes().probe_quotations(**where):
                if len(q) >= L:
                    heads.setdefault(q[:L], q)
            quotes = list(heads.values())
            order = torch.randperm(len(quotes), generator=g).tolist()
            quotes = [quotes[i] for i in order]
            if quotes:
                alphabet = torch.unique(torch.stack([_fortunes().encode(q[:L]) for q in quotes]))
            quoted = [k for k in text_kinds if k in ("fortunes", "scrambled")]
            if len(quotes) < per_kind * len(quoted):
                raise ConfigError(
                    f"The fortunes corpus holds {len(quotes)} held-out quotations of at least "
                    f"{L} bytes, fewer than the {per_kind * len(quoted)} needed ({per_kind} per "
                    f"kind of {', '.join(quoted)}: studied, foils, control and its foils, "
                    f"n_study={n} each); lower probe.n_study or probe.length, or set "
                    "probe.files=null (every corpus file).")
            if "random_words" in self.stimuli:
                self.vocabulary = _fortunes().vocabulary(**where)
        out, used = {}, 0
        for kind in self.stimuli:
            own = []
            if kind in ("fortunes", "scrambled"):
                own, used = quotes[used:used + per_kind], used + per_kind
            rows = self._stimulus_rows(kind, per_kind, g, own, alphabet)
            out[kind] = {name: rows[i * n:(i + 1) * n]
                         for i, name in enumerate(("studied", "foils", "control",
                                                   "control_foils"))}
        return out

    # -- run lifecycle ---------------------------------------------------------------------

    def setup(self, stream: TaskStream, ctx: RunContext) -> None:
        vocab = stream.vocab_size
        if vocab is None:
            raise ConfigError(
                f"probe=retention needs a language-model run, but the stream {stream.name!r} is "
                "not a token stream (it has no vocab_size). Use a token benchmark "
                "with an *_lm model, e.g. benchmark=fortunes model=mom_lm, or drop probe=.")
        self.ctx, self.vocab = ctx, vocab
        self.task_il = stream.task_il
        self.num_tasks = len(stream)
        if self.smoke and (self.n_study > SMOKE_N_STUDY or self.schedule[-1] > SMOKE_LAST_POINT):
            old = (self.n_study, self.schedule)
            self.n_study = min(self.n_study, SMOKE_N_STUDY)
            self.schedule = [s for s in self.schedule if s <= SMOKE_LAST_POINT] or [0]
            self.notes.append(f"smoke=true: n_study={self.n_study} (probe.n_study={old[0]}), "
                              f"measured at {self.schedule} after the study "
                              f"(probe.schedule={old[1]})")
        g = torch.Generator().manual_seed(int(ctx.seed) + 7919)
        sets = self._draw_stimuli(vocab, g)
        self.sets = {kind: {name: rows.to(ctx.device) for name, rows in parts.items()}
                     for kind, parts in sets.items()}
        self.corpus = None
        if self.retention_corpus == "python_source":
            if vocab < 256:
                raise ConfigError(
                    f"probe.retention_corpus=python_source feeds byte tokens (0-255), but the "
                    f"run's vocabulary has {vocab} tokens; use probe.retention_corpus=stream or "
                    "a byte-level stream such as benchmark=fortunes.")
            self.corpus, self.corpus_where = python_source()
        shape = stream.input_shape
        self.window = int(shape[0]) if shape else 64

    def check_run(self, stream: TaskStream, strategy) -> None:
        """Refuse a run with fewer training updates than ``study_after``, counted from the
        strategy's epochs and batch size (`cl_toolkit.probes.planned_updates`); with
        ``study_after=null`` (after the last task) nothing can be short. Under smoke=true the
        probe shrinks instead: ``study_after`` to half the run's updates (at least 1), noted in
        its results. Where the count is only a lower bound (a strategy that picks its own
        training data, e.g. joint) nothing is refused; a probe that never studied says so in
        its results (``note``)."""
        if self.study_after is None:
            return
        per_task, exact = planned_updates(stream, strategy)
        if per_task is None or not exact:
            return
        total = sum(per_task)
        if total >= self.study_after:
            return
        if self.smoke:
            old = self.study_after
            self.study_after = max(1, total // 2)
            self.notes.append(f"smoke=true: the run makes {total} training updates, so the "
                              f"probe studied after {self.study_after} "
                              f"(probe.study_after={old})")
            return
        counts = " + ".join(map(str, per_task))
        raise ConfigError(
            f"probe=retention would measure nothing on this run: it studies after "
            f"probe.study_after={self.study_after} training updates, but the run makes only "
            f"{total} ({counts} over {len(per_task)} task(s): ceil(train size / "
            f"strategy.batch_size={strategy.batch_size}) x strategy.epochs={strategy.epochs} "
            f"per task). Set probe.study_after=null (after the last task) or to at most "
            f"{total}, or train longer (strategy.epochs, a smaller strategy.batch_size, more "
            "training data).")

    def hooks(self) -> dict:
        return {"after_batch": self.after_batch, "after_task": self.after_task}

    def after_batch(self, strategy, task: Task, **_) -> None:
        self.updates += 1
        if self.study_after is not None and self.study_update is None and \
                self.updates >= self.study_after:
            self.run_branches(strategy, task)

    def after_task(self, strategy, task: Task, **_) -> None:
        """After the last task: the study when ``study_after`` is null, else say in the results
        why the curve is empty, if it is."""
        if task.index != self.num_tasks - 1 or self.study_update is not None:
            return
        if self.study_after is None:
            self.run_branches(strategy, task)
        else:
            self.notes.append(f"never studied: the run made {self.updates} training updates, "
                              f"fewer than probe.study_after={self.study_after}; lower it, set "
                              "it to null (after the last task) or train longer")

    # -- branches ----------------------------------------------------------------------------

    @staticmethod
    def _optimizers(strategy) -> dict[str, torch.optim.Optimizer | None]:
        """The strategy's public optimizer attributes (``optimizer`` even while None)."""
        found = {name: value for name, value in vars(strategy).items()
                 if not name.startswith("_") and isinstance(value, torch.optim.Optimizer)}
        if "optimizer" in vars(strategy) and strategy.optimizer is None:
            found["optimizer"] = None
        return found

    def _snapshot(self, strategy) -> dict:
        model = strategy.model
        ctx = self.ctx
        scaler = getattr(getattr(ctx, "trainer", None), "scaler", None)
        return {
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizers": {name: None if opt is None else copy.deepcopy(opt.state_dict())
                           for name, opt in self._optimizers(strategy).items()},
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "generator": ctx.generator.get_state(),
            "scaler": None if scaler is None else copy.deepcopy(scaler.state_dict()),
            "training": model.training}

    def _restore(self, strategy, snap: dict) -> None:
        """Everything `_snapshot` took, in place (the objects the run's loop holds stay)."""
        model = strategy.model
        with torch.no_grad():
            model.load_state_dict(snap["model"])
        now = self._optimizers(strategy)
        for name, state in snap["optimizers"].items():
            if state is None:
                setattr(strategy, name, None)  # made by a study step: the run had none
            else:  # a copy: the optimizer keeps the tensors it loads, the next branch too
                now[name].load_state_dict(copy.deepcopy(state))
        torch.set_rng_state(snap["rng"])
        if snap["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(snap["cuda_rng"])
        self.ctx.generator.set_state(snap["generator"])
        scaler = getattr(getattr(self.ctx, "trainer", None), "scaler", None)
        if scaler is not None and snap["scaler"] is not None:
            scaler.load_state_dict(snap["scaler"])
        model.train(snap["training"])

    def _set_study_lr(self, strategy) -> None:
        if self.study_lr is None:
            return
        opts = [o for o in self._optimizers(strategy).values() if o is not None]
        if not opts:
            raise ConfigError(
                f"probe.study_lr={self.study_lr} needs a strategy that holds its optimizer as a "
                f"public attribute (e.g. strategy.optimizer); {type(strategy).__name__} holds "
                "none at the study. Set probe.study_lr=null to study at the strategy's rate.")
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = self.study_lr

    def _batch_size(self, strategy) -> int:
        b = getattr(strategy, "batch_size", None)
        return b if isinstance(b, int) and not isinstance(b, bool) and b >= 1 else 32

    def _step(self, strategy, task: Task, x: torch.Tensor, y: torch.Tensor) -> None:
        t = torch.full((x.shape[0],), task.index, dtype=torch.long, device=x.device)
        strategy.train_step(x, y, t, task)

    def study(self, strategy, task: Task, k: int, g: torch.Generator) -> int:
        """Show the study set (every kind's studied sequences) ``k`` times; returns the steps."""
        x = torch.cat([parts["studied"] for parts in self.sets.values()])
        if self.exposure == "massed":
            for _ in range(k):
                self._step(strategy, task, x[:, :-1], x[:, 1:])
            return k
        size = self.study_batch_size or self._batch_size(strategy)
        steps = 0
        for _ in range(k):
            order = torch.randperm(len(x), generator=g).to(x.device)
            for i in range(0, len(x), size):
                batch = x[order[i:i + size]]
                self._step(strategy, task, batch[:, :-1], batch[:, 1:])
                steps += 1
        return steps

    def retention_batch(self, task: Task, size: int, g: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch ``(x, y)`` of the retention corpus."""
        dev = self.ctx.device
        if self.corpus is not None:
            starts = torch.randint(len(self.corpus) - self.window - 1, (size,), generator=g)
            w = self.corpus[starts[:, None] + torch.arange(self.window + 1)]
            return w[:, :-1].to(dev), w[:, 1:].to(dev)
        idx = torch.randint(len(task.train), (size,), generator=g)
        return task.train.x[idx].to(dev), task.train.y[idx].to(dev)

    def run_branches(self, strategy, task: Task) -> None:
        """Measure before the study, then one branch per exposure count (see the module)."""
        check_compatible(self, strategy)
        t0 = time.perf_counter()
        self.before = self.measure(strategy, task, None, None)
        snap = self._snapshot(strategy)
        size = self.retention_batch_size or self._batch_size(strategy)
        self.study_steps = []
        try:
            for k in self.exposures:
                seed = int(self.ctx.seed)
                study_g = torch.Generator().manual_seed(seed + 31337)
                retention_g = torch.Generator().manual_seed(seed + 104729)
                self._set_study_lr(strategy)
                self.study_steps.append([k, self.study(strategy, task, k, study_g)])
                done = 0
                for point in self.schedule:
                    while done < point:
                        self._step(strategy, task, *self.retention_batch(task, size,
                                                                         retention_g))
                        done += 1
                    self.points += self.measure(strategy, task, k, point)
                self._restore(strategy, snap)
        except BaseException:
            self._restore(strategy, snap)
            raise
        self.study_update = self.updates
        self.probe_s += time.perf_counter() - t0

    # -- measurement -------------------------------------------------------------------------

    def _words(self, ids: torch.Tensor) -> list:
        if self.vocab == 256:
            return bytes(int(i) for i in ids).split()
        return [int(i) for i in ids]

    @torch.no_grad()
    def measure(self, strategy, task: Task, branch: int | None, since: int | None
                ) -> list[dict]:
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

        kinds = list(self.sets)
        order = [(kind, part) for kind in kinds
                 for part in ("studied", "foils", "control", "control_foils")]
        seqs = torch.cat([self.sets[kind][part] for kind, part in order])
        logits = predict(seqs[:, :-1])
        loss = sequence_loss(logits, seqs)
        m = self.n_study
        at = {key: slice(i * m, (i + 1) * m) for i, key in enumerate(order)}
        members = torch.cat([seqs[at[kind, s]] for kind in kinds for s in SETS])
        member_logits = torch.cat([logits[at[kind, s]] for kind in kinds for s in SETS])
        done = completions(predict, members, member_logits, cached_step(model, task,
                                                                        self.task_il))
        exact, acc = recall_scores(members, done)
        rouge = torch.tensor([rouge_l(self._words(r), self._words(c))
                              for r, c in zip(members.cpu(), done.cpu())])
        rows = []
        for i, (kind, s) in enumerate((kind, s) for kind in kinds for s in SETS):
            sl = slice(i * m, (i + 1) * m)
            foils = "foils" if s == "studied" else "control_foils"
            ls, lf = loss[at[kind, s]], loss[at[kind, foils]]
            rows.append({"stimuli": kind, "set": s, "k": branch, "updates": since,
                         "recognition": recognition(ls, lf),
                         "recall_exact": float(exact[sl].float().mean()),
                         "recall_token": float(acc[sl].mean()),
                         "recall_rouge": float(rouge[sl].mean()),
                         "loss_studied": float(ls.mean()), "loss_foil": float(lf.mean())})
        model.train(was_training)
        return rows

    # -- results and resume ------------------------------------------------------------------

    def results(self) -> dict:
        note = "; ".join(self.notes)
        return {"paper": "https://arxiv.org/abs/2303.17557", "exposures": self.exposures,
                "stimuli": self.stimuli, "n_study": self.n_study, "length": self.length,
                "study_after": self.study_after, "exposure": self.exposure,
                "study_lr": self.study_lr, "study_batch_size": self.study_batch_size,
                "retention_corpus": self.retention_corpus, "corpus": self.corpus_where,
                "retention_batch_size": self.retention_batch_size,
                "schedule": self.schedule, "study_update": self.study_update,
                "study_steps": getattr(self, "study_steps", None),
                "updates": self.updates, "probe_s": self.probe_s,
                "before": list(self.before), "points": list(self.points),
                **({"note": note} if note else {})}

    def state_dict(self) -> dict:
        return {"updates": self.updates, "study_update": self.study_update,
                "probe_s": self.probe_s, "before": list(self.before), "points": list(self.points),
                "notes": list(self.notes), "study_steps": getattr(self, "study_steps", None)}

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
        self.notes = list(dict.fromkeys(self.notes + list(state.get("notes", []))))
        self.study_steps = state.get("study_steps")
