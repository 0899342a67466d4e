"""Recognition, recall and retention of few-shot memories (Orhan 2023,
https://arxiv.org/abs/2303.17557) as a probe on any language-model run (``probe=retention``).

How the study set enters training: once the run has made ``study_after`` updates, the probe
holds a study phase of ``max(exposures)`` rounds. Each round is one step of the strategy's own
optimizer on the strategy's own loss over the study sets still to be shown: the set with ``k``
exposures joins the last ``k`` rounds, so every set is seen exactly ``k`` times, all sets end
together and their retention intervals start at the same update. The strategy's batches are
untouched (same data order as without the probe); training then goes on with the stream's new
sequences, which is the interference. After 0, 1, 3, 10, 30, ... further updates the probe
measures, for every (stimulus kind, k):

- recognition: two-alternative forced choice, the fraction of (studied, foil) pairs in which the
  studied sequence has the lower mean next-token loss (a tie counts half; chance is 0.5);
- recall: greedy continuation of each studied sequence's second half from its first half, as
  exact match (the whole half right) and token accuracy (the share of its positions right).

Stimuli: ``fortunes``, held-out quotations of benchmarks/fortunes.py (in no fortunes training
split), and ``random``, strings of the same length drawn uniformly from the characters of those
quotations (from the whole vocabulary when the run has no fortunes stimuli). A foil is another
sequence of the same kind, never shown.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .probes import Probe
from .strategy import RunContext
from .stream import Task, TaskStream

STIMULI = ("fortunes", "random")


def log_spaced(limit: int) -> list[int]:
    """0, 1, 3, 10, 30, 100, ... up to ``limit`` (the 1-3-10 series)."""
    points, scale = [0], 1
    while scale <= limit:
        points += [p for p in (scale, 3 * scale) if p <= limit]
        scale *= 10
    return points


def on_log_schedule(n: int) -> bool:
    return n in log_spaced(n)


def recognition(loss_studied: torch.Tensor, loss_foil: torch.Tensor) -> float:
    """Share of pairs whose studied sequence has the lower loss; ties count half."""
    wins = (loss_studied < loss_foil).float() + 0.5 * (loss_studied == loss_foil).float()
    return float(wins.mean())


def sequence_loss(logits: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss ``[N]`` of ``seqs`` ``[N, L]`` from ``logits`` ``[N, L-1, V]`` of
    ``seqs[:, :-1]``."""
    return F.cross_entropy(logits.transpose(1, 2).float(), seqs[:, 1:],
                           reduction="none").mean(1)


@torch.no_grad()
def recall(predict: Callable[[torch.Tensor], torch.Tensor], seqs: torch.Tensor,
           logits: torch.Tensor | None = None, step: Callable | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation of the second half of each of ``seqs`` ``[N, L]`` from its first
    half: ``(exact match [N] bool, token accuracy [N])``.

    ``predict(ids [n, T]) -> logits [n, T, V]``; ``logits`` of ``seqs[:, :-1]`` may be passed to
    save a forward pass. A continuation equals the truth exactly when every teacher-forced
    argmax of the second half is right, and agrees with it up to the first wrong one, so only
    the sequences with an error are decoded, from the earliest first error on. ``step(ids,
    caches) -> (logits, caches)`` decodes with the model's cache (one token per call) instead
    of running ``predict`` over the whole prefix for every token.
    """
    n, L = seqs.shape
    h = L // 2
    if logits is None:
        logits = predict(seqs[:, :-1])
    right = logits[:, h - 1:].argmax(-1) == seqs[:, h:]
    exact = right.all(1)
    acc = torch.ones(n, device=seqs.device)
    todo = (~exact).nonzero().squeeze(1)
    if len(todo):
        first = int((~right[todo]).float().argmax(1).min())
        out = seqs[todo, :h + first]
        if step is None:
            while out.shape[1] < L:
                out = torch.cat([out, predict(out)[:, -1].argmax(-1, keepdim=True)], 1)
        else:
            last, caches = step(out, None)
            while out.shape[1] < L:
                out = torch.cat([out, last[:, -1].argmax(-1, keepdim=True)], 1)
                if out.shape[1] < L:
                    last, caches = step(out[:, -1:], caches)
        acc[todo] = (out[:, h:] == seqs[todo, h:]).float().mean(1)
    return exact, acc


class RetentionProbe(Probe):
    """The retention probe; settings as in conf/probe/retention.yaml."""

    key = "retention"

    def __init__(self, exposures: Sequence[int] = (1, 3, 10),
                 stimuli: Sequence[str] = STIMULI, n_study: int = 8, length: int = 32,
                 study_after: int = 100, schedule: Sequence[int] | None = None,
                 path: str | None = None, files: Sequence[str] | None = None):
        from cl_toolkit.benchmarks import fortunes

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
        self.schedule = None if schedule is None else sorted(set(int(s) for s in schedule))
        self.path = path or fortunes.DEFAULT_PATH
        self.files = fortunes.DEFAULT_FILES if files is None else list(files)
        self.updates, self.study_update, self.probe_s = 0, None, 0.0
        self.before: list[dict] = []
        self.points: list[dict] = []

    def setup(self, stream: TaskStream, ctx: RunContext) -> None:
        from cl_toolkit.benchmarks import fortunes

        vocab = stream.vocab_size
        if vocab is None:
            raise ConfigError(
                f"probe=retention needs a language-model run, but the stream {stream.name!r} is "
                "not a token stream (it has no vocab_size). Use a token benchmark "
                "with an *_lm model, e.g. benchmark=fortunes model=mom_lm, or drop probe=.")
        g = torch.Generator().manual_seed(int(ctx.seed) + 7919)
        need, sets = len(self.exposures) * self.n_study, []
        pool = None
        if "fortunes" in self.stimuli:
            if vocab < fortunes.VOCAB_SIZE:
                raise ConfigError(
                    f"probe.stimuli has 'fortunes' (byte tokens 0-255) but the run's vocabulary "
                    f"has {vocab} tokens; use probe.stimuli=[random] or a byte-level stream such "
                    "as benchmark=fortunes.")
            pool = fortunes.probe_sequences(self.length, self.path, self.files)
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

    def hooks(self) -> dict:
        return {"after_batch": self.after_batch}

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
        """``max(exposures)`` optimizer steps of the strategy; set k joins the last k."""
        opt = getattr(strategy, "optimizer", None)
        if opt is None or not callable(getattr(strategy, "loss", None)):
            raise ConfigError(
                f"probe=retention trains the study set with the strategy's optimizer and loss, "
                f"which {type(strategy).__name__} does not expose; use a gradient-trained "
                "strategy (naive, replay, joint, ...).")
        top = max(self.exposures)
        for r in range(top):
            x = torch.cat([s for _, k, s, _ in self.sets if r >= top - k])
            t = torch.full((x.shape[0],), task.index, dtype=torch.long, device=x.device)
            loss = strategy.loss(x[:, :-1], x[:, 1:], t, task)
            aux = getattr(strategy.model, "aux_loss", None)  # the training objective includes it
            if aux is not None:
                loss = loss + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

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
        exact, acc = recall(predict, studied, logits[:n], self._cached_step(strategy, task))
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

    @staticmethod
    def _cached_step(strategy, task: Task) -> Callable | None:
        """Cached decoding of the shared sequence backbone (``TokenModel.lm.step``), if any."""
        model = strategy.model
        lm = getattr(model, "lm", None)
        if not callable(getattr(lm, "step", None)):
            return None

        def step(ids, caches):
            t = strategy._task_ids(ids, task) if getattr(model, "uses_task_id", False) else None
            return lm.step(ids, caches, t)
        return step

    def results(self) -> dict:
        return {"paper": "https://arxiv.org/abs/2303.17557", "exposures": self.exposures,
                "stimuli": self.stimuli, "n_study": self.n_study, "length": self.length,
                "study_after": self.study_after, "study_update": self.study_update,
                "updates": self.updates, "probe_s": self.probe_s,
                "before": list(self.before), "points": list(self.points)}

    def state_dict(self) -> dict:
        return {"updates": self.updates, "study_update": self.study_update,
                "probe_s": self.probe_s, "before": list(self.before), "points": list(self.points)}

    def load_state_dict(self, state: dict) -> None:
        self.updates, self.study_update = state["updates"], state["study_update"]
        self.probe_s, self.before, self.points = state["probe_s"], state["before"], state["points"]


def _curves(runs: list[dict]) -> dict:
    """``{(model, stimuli, k): {updates or "before": {measure: [one value per run]}}}``;
    ``loss_gain`` is how much more the studied sequences' loss fell than the foils' since the
    measurement before the study (nats), which cancels the sets' chance differences."""
    out: dict = {}
    for r in runs:
        extra = r.get("extras", {}).get("retention")
        if not extra:
            continue
        model = r.get("config", {}).get("model", {}).get("name", "?")
        gap0 = {(p["stimuli"], p["k"]): p["loss_foil"] - p["loss_studied"]
                for p in extra["before"]}
        for p in extra["before"] + extra["points"]:
            at = "before" if p["updates"] is None else p["updates"]
            cell = out.setdefault((model, p["stimuli"], p["k"]), {}).setdefault(at, {})
            for m in MEASURES:
                cell.setdefault(m, []).append(p[m])
            if at != "before":
                gap = p["loss_foil"] - p["loss_studied"]
                cell.setdefault("loss_gain", []).append(gap - gap0[(p["stimuli"], p["k"])])
    return out


MEASURES = ("recognition", "recall_exact", "recall_token")


def tables(runs: list[dict]) -> str:
    """Markdown: one table per measure, a row per (model, stimuli, k), a column per point
    (mean over runs, in %; ``loss_gain`` in nats, see `_curves`; the number of runs in the last
    column)."""
    curves = _curves(runs)
    if not curves:
        return ""
    points = sorted({a for c in curves.values() for a in c if a != "before"})
    md = []
    for m in MEASURES + ("loss_gain",):
        head = ["model", "stimuli", "k", "before"] + [str(p) for p in points] + ["runs"]
        unit, scale, fmt = ("nats", 1, "{:+.2f}") if m == "loss_gain" else ("%", 100, "{:.0f}")
        md += [f"{m} ({unit}) after n updates of new text", "",
               "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (model, kind, k), c in sorted(curves.items()):
            cells = [fmt.format(scale * sum(c[a][m]) / len(c[a][m])) if m in c.get(a, {})
                     else "" for a in ["before"] + points]
            n = max(len(v.get(m, ())) for v in c.values())
            md.append("| " + " | ".join([model, kind, str(k)] + cells + [str(n)]) + " |")
        md.append("")
    return "\n".join(md)


def render(runs: list[dict], out_dir) -> tuple[str, str]:
    """Report renderer (report.EXTRA_RENDERERS): the tables plus one retention plot per model."""
    import base64
    import html
    import io
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(runs)
    if not curves:
        return "", ""
    md, frag = ["### Retention (recognition, recall)", "", tables(runs)], []
    frag.append("<h3>Retention (recognition, recall)</h3>")
    for model in sorted({key[0] for key in curves}):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharex=True)
        ks = sorted({key[2] for key in curves if key[0] == model})
        for (name, kind, k), c in sorted(curves.items()):
            if name != model:
                continue
            xs = sorted(a for a in c if a != "before")
            for ax, m in zip(axes, MEASURES):
                ys = [100 * sum(c[a][m]) / len(c[a][m]) for a in xs]
                ax.plot([x + 1 for x in xs], ys, marker="o", ms=3, color=f"C{ks.index(k)}",
                        ls="-" if kind == "fortunes" else "--", label=f"{kind}, k={k}")
        for ax, m in zip(axes, MEASURES):
            ax.set(xscale="log", xlabel="updates after the study + 1", ylabel=f"{m} (%)",
                   ylim=(-5, 105))
            if m == "recognition":
                ax.axhline(50, color="grey", lw=0.8, ls=":")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{model}: retention of studied sequences (solid: fortunes, dashed: random)")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        name = f"retention_{model}.png"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / name).write_bytes(buf.getvalue())
        md += [f"![retention {model}]({name})", ""]
        data = base64.b64encode(buf.getvalue()).decode()
        frag.append(f'<img alt="{html.escape(model)} retention" src="data:image/png;base64,'
                    f'{data}">')
    frag.append("<pre>" + html.escape(tables(runs)) + "</pre>")
    return "\n".join(md), "\n".join(frag)


def main(argv: list[str] | None = None) -> None:
    """``python -m cl_toolkit.retention RUN_OR_SWEEP_DIR... [-o DIR]``: print the tables of the
    retention runs found there and write their plots to DIR (default: the first path)."""
    import argparse
    import json
    from pathlib import Path

    from .report import find_results

    p = argparse.ArgumentParser(prog="python -m cl_toolkit.retention")
    p.add_argument("paths", nargs="+")
    p.add_argument("-o", "--out", default=None)
    args = p.parse_args(argv)
    runs = [json.loads(f.read_text()) for f in find_results(args.paths)]
    md, _ = render(runs, Path(args.out or args.paths[0]))
    print(md)


if __name__ == "__main__":
    main()
