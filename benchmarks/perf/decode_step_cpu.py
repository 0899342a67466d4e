"""CPU cost of one cached decoding step (``SequenceLanguageModel.step``, one token for a batch)
of the four language-model presets: the retention probe's recall decodes this way.

    python -m cl_toolkit.benchmarks.perf.decode_step_cpu [--batch 48] [--steps 16] [--repeats 5]

The recurrent memories decode through the fused recurrent functions. On the CPU these run the
token loop batched over all packed sequences (kernels/recurrent_torch.py, backend 'torch');
the per-sequence reference loop (backend 'naive'), which a MoM layer pays once per (memory,
sample) state, is timed on the same model for comparison. Best of ``repeats``, process CPU
time, one thread.
"""
from __future__ import annotations

import argparse
import time

import torch

PRESETS = {  # conf/model/*_lm.yaml: equal parameters, hidden 64, 2 layers, 2 heads
    "mom_lm": dict(mixer="mom", mlp_ratio=2.0, num_memories=4, topk=2),
    "gdn_lm": dict(mixer="gdn", mlp_ratio=4.9375),
    "gla_lm": dict(mixer="gla", mlp_ratio=4.953125),
    "transformer_lm": dict(mixer="transformer", mlp_ratio=5.359375),
}


def build(name: str, backend: str, vocab: int = 256):
    from cl_toolkit.kernels.backbones import SequenceLanguageModel

    kw = dict(PRESETS[name])
    if kw["mixer"] != "transformer":
        kw.update(backend=backend, chunk_size=32)
    torch.manual_seed(0)
    return SequenceLanguageModel(vocab, causal=True, hidden_size=64, num_layers=2,
                                 num_heads=2, **kw).eval()


@torch.no_grad()
def step_seconds(model, ids: torch.Tensor, steps: int, repeats: int) -> float:
    """Best CPU seconds per decoded token over ``repeats`` decodes of ``steps`` tokens."""
    best = float("inf")
    for _ in range(repeats):
        _, caches = model.step(ids[:, :-steps], None)
        t0 = time.process_time()
        for i in range(ids.shape[1] - steps, ids.shape[1]):
            _, caches = model.step(ids[:, i:i + 1], caches)
        best = min(best, (time.process_time() - t0) / steps)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ids = torch.randint(256, (args.batch, 2 * args.steps))
    print(f"batch {args.batch}, {args.steps} decoded tokens after a {args.steps}-token prefill")
    print("| model | ms / token, batched loop (torch) | ms / token, per-sequence loop (naive) "
          "| naive / torch |")
    print("|---|---|---|---|")
    for name in PRESETS:
        fast = step_seconds(build(name, "torch"), ids, args.steps, args.repeats)
        if PRESETS[name]["mixer"] == "transformer":
            print(f"| {name} | {1e3 * fast:.2f} | (no recurrence) | |")
            continue
        slow = step_seconds(build(name, "naive"), ids, args.steps, args.repeats)
        print(f"| {name} | {1e3 * fast:.2f} | {1e3 * slow:.2f} | {slow / fast:.1f}x |")


if __name__ == "__main__":
    main()
