"""Training throughput: our `naive` strategy vs Avalanche's `Naive` vs a plain PyTorch loop.

Same model (MLP 784-400-400-10), same stream (split Fashion-MNIST, 5 x 2 classes, class-il so
all three use the same single head and loss), SGD, batch 64, 1 epoch per task, the same
in-memory tensors. Prints samples/s of each and the ratios; repeats are interleaved so machine
noise hits all three alike and the median is reported.

    python perf/trainer_vs_avalanche.py [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from cl_toolkit.benchmarks.fashion_mnist import split_fashion_mnist
from cl_toolkit.models import MLP, Classifier
from cl_toolkit.strategies.naive import Naive
from cl_toolkit.strategy import RunContext

BATCH, LR = 64, 0.05


def model_for(stream) -> Classifier:
    torch.manual_seed(0)
    return Classifier(MLP(stream.input_shape, hidden=(400, 400)), stream.num_classes)


def plain_loop(stream) -> float:
    """The practical ceiling: a hand-written loop over the same tensors."""
    model = model_for(stream)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for task in stream:
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        x_all, y_all = task.train.x, task.train.y
        order = torch.randperm(len(y_all), generator=g)
        for s in range(0, len(y_all), BATCH):
            idx = order[s:s + BATCH]
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def ours(stream) -> float:
    strategy = Naive(epochs=1, batch_size=BATCH, lr=LR)
    strategy.setup(stream, model_for(stream), RunContext(generator=torch.Generator().manual_seed(0)))
    t0 = time.perf_counter()
    for task in stream:
        strategy.learn(task)
    return time.perf_counter() - t0


def avalanche(stream) -> float:
    from avalanche.training import Naive as AvlNaive
    from avalanche.training.plugins import EvaluationPlugin

    from cl_toolkit.benchmarks.avalanche_adapter import to_avalanche

    bench = to_avalanche(stream)
    model = model_for(stream)
    strategy = AvlNaive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                        criterion=nn.CrossEntropyLoss(), train_mb_size=BATCH, train_epochs=1,
                        device="cpu", evaluator=EvaluationPlugin(loggers=[]))
    t0 = time.perf_counter()
    for exp in bench.train_stream:
        strategy.train(exp, num_workers=0)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-avalanche", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stream = split_fashion_mnist(scenario="class-il")
    n = sum(len(t.train) for t in stream)
    runners = {"plain loop": plain_loop, "cl_toolkit naive": ours}
    if not args.skip_avalanche:
        runners["avalanche Naive"] = avalanche
    times = {k: [] for k in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            times[name].append(fn(stream))
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"split Fashion-MNIST, MLP 784-400-400-10, batch {BATCH}, 1 epoch, {n} samples, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'loop':<18}{'samples/s':>12}{'vs plain':>10}")
    for name, r in rate.items():
        print(f"{name:<18}{r:>12.0f}{r / rate['plain loop']:>10.2f}")
    if "avalanche Naive" in rate:
        print(f"cl_toolkit / avalanche: {rate['cl_toolkit naive'] / rate['avalanche Naive']:.2f}x")


if __name__ == "__main__":
    main()
