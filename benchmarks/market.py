"""Market streams: a cross-sectional panel (days x stocks x features) cut into consecutive
periods (regimes), one task per period, scored by the information coefficient (task kind
``cross_section``, domain-il).

Layout (shared by every market stream and model): ``x [D, S, F * W]`` holds, per day and stock,
``F`` features over a window of ``W`` days, feature-major and oldest day first (Qlib's Alpha360
order: CLOSE59 ... CLOSE0, then OPEN59 ...), so a model recovers ``[.., W, F]`` by a reshape;
``y [D, S]`` is the next-period return (NaN: stock absent that day). ``stream.info`` carries
``num_features`` (F), ``window`` (W), ``concepts`` (stock x concept matrix ``[S, C]``, used by
HIST/MTMD), ``market_value`` (``[S]``, concept weights) and the stock names.

`synthetic_market` is the embedded default (see its docstring); `check_panel` is the gate every
market builder passes its panel through (bad input -> `ConfigError` naming the key and the fix).
"""
from __future__ import annotations

import math

import torch

from dataclasses import dataclass

from cl_toolkit.errors import ConfigError
from cl_toolkit.stream import Task, TaskStream, TensorData
from cl_toolkit.task_kinds import CrossSection
from cl_toolkit.validation import at_least, between, one_of

MARKET_SCENARIO = one_of("domain-il", note="market periods share one target (the next "
                         "return): a domain shift, not new classes")


@dataclass
class MarketStream(TaskStream):
    """A `TaskStream` that also carries the panel's stock-level arrays (kept out of ``info``,
    which goes into results.json): the concept matrix ``[S, C]``, market values ``[S]``, the
    stock names, and the window layout (``info["num_features"]``, ``info["window"]``)."""

    concepts: torch.Tensor | None = None
    market_value: torch.Tensor | None = None
    stocks: tuple[str, ...] = ()

    def describe(self) -> dict:
        out = super().describe()
        out["concepts"] = None if self.concepts is None else list(self.concepts.shape)
        return out


def check_panel(x: torch.Tensor, y: torch.Tensor, concepts: torch.Tensor | None, *,
                num_features: int, window: int, history: int | None = None,
                names: tuple[str, str] = ("benchmark", "benchmark.concepts"),
                min_stocks: int | None = None, fillna: bool = False) -> torch.Tensor:
    """Refuse a panel no model can learn from, before anything trains; returns ``x`` (NaN
    features set to 0 when ``fillna``: Qlib's Fillna processor convention, our default off so
    that a NaN never reaches a loss silently)."""
    where, ckey = names
    if x.dim() != 3 or y.shape != x.shape[:2]:
        raise ConfigError(f"{where}: a market panel needs x [days, stocks, features] and y "
                          f"[days, stocks]; got x {tuple(x.shape)}, y {tuple(y.shape)}.")
    if history is not None and window > history:
        raise ConfigError(f"{where}.window={window} is longer than the history "
                          f"({history} days); use a window of at most {history} days.")
    if x.shape[2] != num_features * window:
        raise ConfigError(f"{where}: x has {x.shape[2]} columns per stock, not num_features x "
                          f"window = {num_features} x {window}.")
    bad = torch.isnan(x)
    if bool(bad.any()):
        if not fillna:
            d, s, _ = bad.nonzero()[0].tolist()
            raise ConfigError(f"{where}: {int(bad.sum())} feature values are NaN (first: day "
                              f"{d}, stock {s}); set {where}.fillna=true to fill them with 0 "
                              "(Qlib's Fillna) or clean the data.")
        x = torch.nan_to_num(x, nan=0.0)
    if concepts is not None and (concepts.dim() != 2 or concepts.shape[0] != x.shape[1]):
        raise ConfigError(f"{ckey}: the concept matrix is {tuple(concepts.shape)} but the panel "
                          f"has {x.shape[1]} stocks; it needs one row per stock of the panel, "
                          "in the panel's stock order.")
    k = CrossSection.precision_k if min_stocks is None else min_stocks
    present = (~torch.isnan(y)).sum(1)
    if len(present) and int(present.min()) < k:
        d = int(present.argmin())
        raise ConfigError(f"{where}: day {d} has {int(present[d])} stocks, fewer than "
                          f"k={k} of precision@k; drop such days or use a universe with at "
                          f"least {k} stocks every day.")
    return x


def robust_zscore(x: torch.Tensor, fit_days: int) -> torch.Tensor:
    """``x [D, S, C]`` with each column c centred on its median and divided by 1.4826 x its
    median absolute deviation (1 where that is 0), then clipped to [-3, 3]: Qlib's
    RobustZScoreNorm with clip_outlier, which HIST/MTMD's data handler applies. The statistics
    pool every (day, stock) of the first ``fit_days`` days only, i.e. the first period's
    training days, so no later day leaks into the features. NaN is ignored and kept."""
    fit = x[:max(1, fit_days)].reshape(-1, x.shape[2])
    # nanquantile, not nanmedian: of an even count the median is the mean of the middle two
    # (numpy's, which Qlib uses); torch's nanmedian returns the lower one
    med = fit.nanquantile(0.5, dim=0)
    mad = (fit - med).abs().nanquantile(0.5, dim=0) * 1.4826
    return ((x - med) / torch.where(mad > 0, mad, torch.ones_like(mad))).clamp(-3, 3)


def first_train_days(days: int, num_tasks: int, test_fraction: float) -> int:
    """How many days the first period of `split_periods` trains on (what `robust_zscore`
    may fit on)."""
    hi = round(days / num_tasks)
    return hi - max(1, round(hi * test_fraction))


def split_periods(x: torch.Tensor, y: torch.Tensor, num_tasks: int, test_fraction: float,
                  names: list[str] | None = None) -> list[Task]:
    """Consecutive calendar periods, one task each; the last ``test_fraction`` of each period's
    days is its test set (a chronological split: our choice, the paper has one train/valid/test
    split and no periods)."""
    D = x.shape[0]
    edges = [round(i * D / num_tasks) for i in range(num_tasks + 1)]
    tasks = []
    for i in range(num_tasks):
        lo, hi = edges[i], edges[i + 1]
        n_test = max(1, round((hi - lo) * test_fraction))
        if hi - lo - n_test < 1:
            raise ConfigError(f"benchmark: period {i} has {hi - lo} days, too few for a train "
                              "and a test part; use fewer tasks (benchmark.num_tasks) or more "
                              "days.")
        cut = hi - n_test
        tasks.append(Task(i, names[i] if names else f"period{i}",
                          TensorData(x[lo:cut], y[lo:cut]), TensorData(x[cut:hi], y[cut:hi]),
                          classes=()))
    return tasks


def _windows(raw: torch.Tensor, window: int) -> torch.Tensor:
    """``raw [T, S, F]`` -> ``[T - W + 1, S, F * W]``, feature-major, oldest day first."""
    w = raw.unfold(0, window, 1)                      # [T-W+1, S, F, W]
    return w.reshape(w.shape[0], w.shape[1], -1).contiguous()


def synthetic_market(num_stocks: int = 100, num_concepts: int = 10, num_features: int = 6,
                     window: int = 20, num_tasks: int = 4, days_per_task: int = 40,
                     test_fraction: float = 0.3, signal_noise: float = 2.0,
                     return_noise: float = 1.0, persistence: float = 0.9,
                     scenario: str = "domain-il", fillna: bool = False,
                     seed: int = 0) -> TaskStream:
    """A factor market generated from ``seed`` (every detail is our choice; the paper uses
    CSI300 data). Each stock belongs to one of ``num_concepts`` concepts (a predefined concept
    matrix, one-hot, market-value weighted). Every concept carries ``num_features`` latent
    signals, AR(1) over days (``persistence``); a stock's observed feature f is its concept's
    signal f plus its own noise (``signal_noise`` x larger), so averaging over the concept's
    stocks, which HIST/MTMD do and a per-stock GRU or MLP cannot, recovers the signal. The
    next-day return is a regime's loading vector times the stock's concept signals plus
    noise; each period (task) draws its own loadings (which factors pay, and with which sign),
    so what one regime taught hurts or helps the next and forgetting is visible."""
    if scenario != "domain-il":
        raise ConfigError(f"benchmark.scenario={scenario!r}; a market stream is domain-il.")
    if num_concepts > num_stocks:
        raise ConfigError(f"benchmark.num_concepts={num_concepts} exceeds num_stocks="
                          f"{num_stocks}; use at most one concept per stock.")
    g = torch.Generator().manual_seed(seed)
    S, C, F, W = num_stocks, num_concepts, num_features, window
    T = num_tasks * days_per_task + W - 1              # raw days, so every window is full
    member = torch.arange(S) % C
    member = member[torch.randperm(S, generator=g)]
    concepts = torch.nn.functional.one_hot(member, C).float()
    market_value = torch.exp(torch.randn(S, generator=g))
    z = torch.zeros(T, C, F)
    z[0] = torch.randn(C, F, generator=g)
    eps = math.sqrt(1 - persistence ** 2)
    for t in range(1, T):
        z[t] = persistence * z[t - 1] + eps * torch.randn(C, F, generator=g)
    raw = z[:, member] + signal_noise * torch.randn(T, S, F, generator=g)
    x = _windows(raw, W)                               # day d's window ends at raw day d+W-1
    loadings = torch.randn(num_tasks, F, generator=g)
    loadings = loadings / loadings.norm(dim=1, keepdim=True)
    regime = torch.arange(x.shape[0]) // days_per_task
    y = (z[W - 1:][:, member] * loadings[regime][:, None, :]).sum(-1) \
        + return_noise * torch.randn(x.shape[0], S, generator=g)
    x = check_panel(x, y, concepts, num_features=F, window=W, history=T, fillna=fillna)
    tasks = split_periods(x, y, num_tasks, test_fraction, [f"regime{i}" for i in
                                                           range(num_tasks)])
    return MarketStream("synthetic_market", tasks, scenario, 0, (S, F * W), seed,
                        info={"num_features": F, "window": W, "num_concepts": C,
                              "loadings": loadings.tolist()},
                        kind="cross_section", concepts=concepts, market_value=market_value,
                        stocks=tuple(f"S{i:03d}" for i in range(S)))


synthetic_market.task_kind = "cross_section"
synthetic_market.ranges = {
    "num_stocks": at_least(CrossSection.precision_k, note="precision@k needs k stocks a day"),
    "num_concepts": at_least(1), "num_features": at_least(1), "window": at_least(1),
    "num_tasks": at_least(1), "days_per_task": at_least(2),
    "test_fraction": between(0, 1, low_open=True, high_open=True),
    "signal_noise": at_least(0), "return_noise": at_least(0),
    "persistence": between(0, 1, high_open=True), "scenario": MARKET_SCENARIO}
synthetic_market.smoke = {"num_stocks": 20, "window": 5, "days_per_task": 6, "num_tasks": 2}
