"""Market models for ``cross_section`` streams (see `cl_toolkit.benchmarks.market` for the data
layout): MTMD (Wang et al., arXiv 2212.08656) and the baselines that isolate its parts at equal
width: ``hist`` (the HIST backbone of Xu et al. 2021, no memory), ``gru`` (the backbone's GRU and
a linear head) and ``window_mlp`` (an MLP over the flattened window).

Each model maps ``x [B, S, F * W]`` (B days) to one score per stock ``[B, S]``; the cross-
section of a day is processed together (concepts are per day). Builders take the stream
(``needs_stream``) because HIST/MTMD need its concept matrix and every model needs the window
layout; they refuse a stream that is not a market stream.

MTMD's memory (`MemoryBank`): L2-normalised prototypes kept as buffers (no gradient). Read:
softmax over each query's cosine similarity to the prototypes, the prototype mixture, and the
query gated element-wise by it. Update (training forward passes only): every query goes to its
nearest prototype; a prototype moves by the weighted sum of its queries and is re-normalised.
"Debiasing" is the read plus averaging the parameters of the last ``average_last`` epochs (the
trainer's epochs: it calls ``end_epoch`` after each, `cl_toolkit.trainer`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..validation import above, at_least, between, one_of

MEMORY_MODES = ("shared", "frozen", "per_task")


def _market_layout(stream, model: str) -> tuple[int, int, int]:
    """(stocks, features, window) of a market stream; a clear refusal for any other stream."""
    info = getattr(stream, "info", {}) or {}
    if stream.kind != "cross_section" or "num_features" not in info or "window" not in info:
        raise ConfigError(
            f"model={model} forecasts stock cross-sections and needs a market stream "
            f"(benchmark=synthetic_market, french_portfolios, sp500_stocks or qlib_market); "
            f"benchmark={stream.name} holds {stream.kind} tasks. Use an image or sequence "
            "model there (model=mlp, cnn, gdn, ...).")
    return stream.input_shape[0], info["num_features"], info["window"]


class MemoryBank(nn.Module):
    """``banks`` banks of ``size`` L2-normalised prototypes of width ``dim``; buffers, so they
    are saved in checkpoints and never get a gradient."""

    def __init__(self, dim: int, size: int, banks: int = 1, generator: torch.Generator | None
                 = None, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature
        # The code initialises prototypes as normalised U(0, 1) vectors; so do we.
        self.register_buffer("keys", F.normalize(torch.rand(banks, size, dim,
                                                            generator=generator), dim=-1))

    def read(self, h: torch.Tensor, bank: int = 0) -> torch.Tensor:
        """``h [N, d]`` gated by its prototype mixture: ``h * softmax(q K^T) K`` with ``q`` the
        normalised ``h`` (cosine similarity: our choice, the prototypes are unit vectors),
        divided by ``temperature`` (1 = none; ours: cosine logits in [-1, 1] give an almost
        uniform attention over 96 prototypes, see RESULTS.md issue 24)."""
        keys = self.keys[bank]
        attn = torch.softmax(F.normalize(h, dim=-1) @ keys.t() / self.temperature, dim=-1)
        return h * (attn @ keys)

    @torch.no_grad()
    def update(self, h: torch.Tensor, bank: int = 0) -> None:
        """Move each prototype by the weighted sum of the queries nearest to it, re-normalise.
        A query's weight is its softmax score over the queries (for its prototype) divided by
        the largest such score among that prototype's queries (the memory-guided normality
        update that MTMD's bank follows; the exact weighting is our choice where the public
        code is not shown). Vectorised: no loop over stocks."""
        keys = self.keys[bank]
        q = F.normalize(h.detach().float(), dim=-1)                 # [N, d]
        score = q @ keys.t()                                        # [N, M]
        nearest = score.argmax(1)                                   # [N]
        over_queries = torch.softmax(score, dim=0)                  # [N, M]
        w = over_queries.gather(1, nearest[:, None]).squeeze(1)     # [N]
        top = torch.zeros(keys.shape[0], dtype=w.dtype, device=w.device).scatter_reduce(
            0, nearest, w, reduce="amax", include_self=False)
        w = w / top[nearest]
        moved = torch.zeros_like(keys).index_add_(0, nearest, w[:, None] * q)
        self.keys[bank] = F.normalize(keys + moved, dim=-1)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a [B, N, d]`` with every row of ``b [B, M, d]``."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)


class _WindowModel(nn.Module):
    """Shared parts: the window reshape and averaging of the parameters of the last
    ``average_last`` epochs of each fit (a task's training), as the HIST/MTMD code does after
    its epochs. The epochs are the trainer's: it calls `end_epoch` after the last step of every
    epoch, whatever the batches held (a replay strategy's replayed days, a joint strategy's
    union of tasks). After the fit's last epoch the parameters become the mean of those kept;
    buffers (the memory banks, ``fit_count``) are not averaged (our choice: the banks are
    updated without gradient and stay as the last update left them)."""

    uses_task_id = False

    def __init__(self, F_: int, W: int, average_last: int):
        super().__init__()
        self.F, self.W, self.average_last = F_, W, average_last
        # fits (tasks) finished: a buffer, so that a resumed run knows which bank / task it is in
        self.register_buffer("fit_count", torch.zeros((), dtype=torch.long))
        self._snapshots: list[dict] = []
        self.training = False

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, F * W]`` -> ``[B * S, W, F]``."""
        B, S, _ = x.shape
        return x.reshape(B * S, self.F, self.W).transpose(1, 2)

    def current_bank(self) -> int:
        return 0

    @property
    def fits(self) -> int:
        return int(self.fit_count)

    def end_epoch(self, epoch: int, epochs: int) -> None:
        """Epoch ``epoch`` (0-based) of ``epochs`` of the current fit has ended (the trainer's
        signal). Keeps the parameters of each of the last ``average_last`` epochs; after the
        last epoch replaces the parameters by their mean and counts the fit."""
        if epoch == 0:
            self._snapshots = []
        if self.average_last > 1 and epoch >= epochs - self.average_last:
            self._snapshots.append({k: v.detach().clone() for k, v in
                                    self.named_parameters()})
        if epoch == epochs - 1:
            if len(self._snapshots) > 1:
                with torch.no_grad():
                    for k, p in self.named_parameters():
                        p.copy_(torch.stack([s[k] for s in self._snapshots]).mean(0))
            self._snapshots = []
            self.fit_count += 1

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.score(x)


class WindowMLP(_WindowModel):
    def __init__(self, F_, W, hidden, dropout):
        super().__init__(F_, W, average_last=1)
        self.net = nn.Sequential(nn.Linear(F_ * W, hidden), nn.LeakyReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 1))

    def score(self, x):
        return self.net(x).squeeze(-1)


class GRUModel(_WindowModel):
    def __init__(self, F_, W, hidden, num_layers, dropout, average_last=1):
        super().__init__(F_, W, average_last)
        self.gru = nn.GRU(F_, hidden, num_layers, batch_first=True,
                          dropout=dropout if num_layers > 1 else 0.0)
        self.hidden = hidden

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        out, _ = self.gru(self.sequence(x))
        return out[:, -1].reshape(B, S, self.hidden)


class GRUHead(GRUModel):
    def __init__(self, F_, W, hidden, num_layers, dropout):
        super().__init__(F_, W, hidden, num_layers, dropout)
        self.head = nn.Linear(hidden, 1)

    def score(self, x):
        return self.head(self.encode(x)).squeeze(-1)


class HIST(GRUModel):
    """HIST's three branches over the GRU state, batched over days; with ``memory`` the two
    MTMD banks (after the predefined- and hidden-concept representations)."""

    def __init__(self, stream, F_, W, hidden, num_layers, dropout, k_hidden, average_last,
                 memory, bank_size, memory_update, memory_tasks, seed, temperature=1.0):
        super().__init__(F_, W, hidden, num_layers, dropout, average_last)
        concepts = getattr(stream, "concepts", None)
        if concepts is None:
            raise ConfigError(f"model=hist/mtmd needs a concept matrix; benchmark={stream.name} "
                              "has none. Use model=gru or window_mlp, or give the stream "
                              "concepts.")
        concepts = torch.as_tensor(concepts, dtype=torch.float32)
        S = stream.input_shape[0]
        if concepts.dim() != 2 or concepts.shape[0] != S:
            raise ConfigError(f"benchmark concepts: the concept matrix is "
                              f"{tuple(concepts.shape)} but the panel has {S} stocks; give one "
                              "row per stock of the panel, in the panel's order.")
        mv = getattr(stream, "market_value", None)
        mv = torch.ones(S) if mv is None else torch.as_tensor(mv, dtype=torch.float32)
        self.register_buffer("stock2concept", concepts * mv[:, None])
        self.k_hidden = min(k_hidden, S - 1)
        lin = lambda: nn.Linear(hidden, hidden)  # noqa: E731
        self.fc_ps, self.fc_ps_back, self.fc_ps_fore = lin(), lin(), lin()
        self.fc_hs, self.fc_hs_back, self.fc_hs_fore = lin(), lin(), lin()
        self.fc_indi = lin()
        self.fc_out = nn.Linear(hidden, 1)
        self.act = nn.LeakyReLU()
        self.memory_update, self.memory_tasks = memory_update, memory_tasks
        self.banks = None
        if memory:
            n = len(stream.tasks) if memory_tasks == "per_task" else 1
            # seed null: the run's seeded global generator (so seed=0,1,2 draw other banks)
            g = None if seed is None else torch.Generator().manual_seed(seed)
            self.banks = nn.ModuleList([MemoryBank(hidden, bank_size, n, g, temperature),
                                        MemoryBank(hidden, bank_size, n, g, temperature)])

    def current_bank(self) -> int:
        """Per-task banks: the bank of the task being learned, at test the latest trained one
        (a domain-il stream gives no task id: our choice)."""
        if self.memory_tasks != "per_task":
            return 0
        n = self.banks[0].keys.shape[0]
        return min(self.fits if self.training else max(self.fits - 1, 0), n - 1)

    def _memory(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.banks is None:
            return h
        B, S, d = h.shape
        flat, bank = h.reshape(B * S, d), self.current_bank()
        if self.training and self.memory_update and not (
                self.memory_tasks == "frozen" and self.fits > 0):
            self.banks[i].update(flat, bank)
        return self.banks[i].read(flat, bank).reshape(B, S, d)

    def score(self, x):
        h = self.encode(x)                                              # [B, S, H]
        S = h.shape[1]
        # predefined concepts: market-value-weighted means of their stocks' states
        s2c = self.stock2concept
        col = s2c.sum(0)
        weights = s2c / torch.where(col > 0, col, torch.ones_like(col))
        concept = torch.einsum("sc,bsh->bch", weights, h)               # [B, C, H]
        logits = _cos(h, concept).masked_fill((col == 0)[None, None], float("-inf"))
        p = torch.softmax(logits, -1) @ concept                        # [B, S, H]
        p = self._memory(0, self.fc_ps(p))
        p_back, p_out = self.fc_ps_back(p), self.act(self.fc_ps_fore(p))
        # hidden concepts: each stock with the stocks that name it among their top-K neighbours
        r = h - p_back
        sim = _cos(r, r)
        eye = torch.eye(S, dtype=torch.bool, device=x.device)
        top = sim.masked_fill(eye, float("-inf")).topk(self.k_hidden, -1).indices
        mask = torch.zeros_like(sim).scatter_(-1, top, 1.0)             # [B, i, j]: j near i
        chosen = mask.sum(1) > 0                                        # [B, j] named by someone
        member = (sim * mask).transpose(1, 2) + torch.diag_embed(chosen.float())  # [B, j, i]
        hidden_c = member @ r                                           # [B, S, H]
        # as in HIST, a stock nobody names forms no hidden concept
        logits = _cos(r, hidden_c).masked_fill(~chosen[:, None, :], float("-inf"))
        q = torch.softmax(logits, -1) @ hidden_c
        q = self._memory(1, self.fc_hs(q))
        q_back, q_out = self.fc_hs_back(q), self.act(self.fc_hs_fore(q))
        indi = self.act(self.fc_indi(h - p_back - q_back))
        return self.fc_out(p_out + q_out + indi).squeeze(-1)

    def memory_bytes(self) -> int:
        """The prototype banks (every option counts what it keeps: per_task keeps one bank per
        task)."""
        if self.banks is None:
            return 0
        return sum(b.keys.numel() * b.keys.element_size() for b in self.banks)


_COMMON = {"hidden": at_least(1), "num_layers": at_least(1),
           "dropout": between(0, 1, high_open=True)}
_SMOKE = {"hidden": 8}


def mtmd(stream, hidden: int = 64, num_layers: int = 2, dropout: float = 0.0, k_hidden: int = 3,
         average_last: int = 5, memory: bool = True, bank_size: int = 96,
         memory_update: bool = True, memory_tasks: str = "shared", seed: int | None = None,
         temperature: float = 1.0) -> nn.Module:
    """MTMD: HIST + the two prototype banks + parameter averaging over the last epochs.
    ``memory_tasks``: ``shared`` (one bank, updated in every task), ``frozen`` (updated in the
    first task only) or ``per_task`` (one bank per task: the memory-partitioned form)."""
    _, F_, W = _market_layout(stream, "mtmd")
    if memory_tasks not in MEMORY_MODES:
        raise ConfigError(f"model.memory_tasks={memory_tasks!r}; choose one of "
                          f"{', '.join(MEMORY_MODES)}.")
    return HIST(stream, F_, W, hidden, num_layers, dropout, k_hidden, average_last, memory,
                bank_size, memory_update, memory_tasks, seed, temperature)


def hist(stream, hidden: int = 64, num_layers: int = 2, dropout: float = 0.0, k_hidden: int = 3,
         average_last: int = 5) -> nn.Module:
    """HIST at MTMD's width, no memory (the HIST code averages the last epochs too)."""
    _, F_, W = _market_layout(stream, "hist")
    return HIST(stream, F_, W, hidden, num_layers, dropout, k_hidden, average_last, False, 1,
                False, "shared", None)


def gru(stream, hidden: int = 64, num_layers: int = 2, dropout: float = 0.0) -> nn.Module:
    """The backbone's GRU and a linear head: no concepts, no memory."""
    _, F_, W = _market_layout(stream, "gru")
    return GRUHead(F_, W, hidden, num_layers, dropout)


def window_mlp(stream, hidden: int = 64, dropout: float = 0.0) -> nn.Module:
    """A 2-hidden-layer MLP over each stock's flattened window (no time structure)."""
    _, F_, W = _market_layout(stream, "window_mlp")
    return WindowMLP(F_, W, hidden, dropout)


for _f in (mtmd, hist, gru, window_mlp):
    _f.needs_stream = True
    _f.task_kinds = ("cross_section",)  # what these models take (their builders refuse others)
mtmd.ranges = {**_COMMON, "k_hidden": at_least(1), "average_last": at_least(1),
               "bank_size": at_least(1), "memory_tasks": one_of(*MEMORY_MODES),
               "temperature": above(0)}
hist.ranges = {**_COMMON, "k_hidden": at_least(1), "average_last": at_least(1)}
gru.ranges = dict(_COMMON)
window_mlp.ranges = {"hidden": at_least(1), "dropout": between(0, 1, high_open=True)}
mtmd.smoke = {**_SMOKE, "bank_size": 4}
hist.smoke = gru.smoke = window_mlp.smoke = dict(_SMOKE)
