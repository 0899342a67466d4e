"""Token streams train as fast as a plain PyTorch loop (issue 17 target: >= 0.9x).

For each language model: one epoch of ``SupervisedStrategy.learn`` on an MQAR task against a
hand-written loop over the same model, optimizer and batches (same shuffled order, same
loss), alternating, best of ``--repeats``. Times are the process CPU seconds (one thread), which
other jobs on a shared machine disturb less than wall time.

    PYTHONPATH=. python -m perf.token_stream_speed
"""
from __future__ import annotations

import argparse
import time

import torch

from cl_toolkit import registry
from cl_toolkit.benchmarks.mqar import mqar_stream
from cl_toolkit.strategy import RunContext, SupervisedStrategy, make_optimizer, supervised_loss


def plain_loop(model, data, batch_size: int, seed: int, opt) -> None:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)
    model.train()
    for s in range(0, len(data), batch_size):
        idx = order[s:s + batch_size]
        loss = supervised_loss(model(data.x[idx]), data.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def cpu_seconds(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="transformer_lm,gla_lm,gdn_lm,mom_lm")
    ap.add_argument("--train-size", type=int, default=640)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    stream = mqar_stream(vocab_size=max(64, args.seq_len + 1), seq_len=args.seq_len, num_pairs=[4],
                         train_size=args.train_size, test_size=4, probe_pairs=[])
    task = stream[0]
    print("| model | steps | plain loop (s) | strategy.learn (s) | speed (plain / learn) |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = registry.build("model", name, stream, chunk_size=32) if name != \
            "transformer_lm" else registry.build("model", name, stream)
        strategy = SupervisedStrategy(epochs=1, batch_size=args.batch_size, lr=1e-3,
                                      optimizer="adamw", reset_optimizer=False)
        ctx = RunContext(generator=torch.Generator().manual_seed(0))
        strategy.setup(stream, model, ctx)
        opt = make_optimizer("adamw", model.parameters(), 1e-3)
        plain_loop(model, task.train, args.batch_size, 0, opt)  # warm-up both paths
        strategy.learn(task)
        plain, learn = float("inf"), float("inf")
        for r in range(args.repeats):
            plain = min(plain, cpu_seconds(lambda: plain_loop(model, task.train,
                                                              args.batch_size, r, opt)))
            learn = min(learn, cpu_seconds(lambda: strategy.learn(task)))
        steps = -(-args.train_size // args.batch_size)
        print(f"| {name} | {steps} | {plain:.2f} | {learn:.2f} | {plain / learn:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
