"""CPU cost of one cached decoding step (``SequenceLanguageModel.step``, one token for a batch)
of the four language-model presets: the retention probe's recall decodes this way.

    python -m perf.decode_step_cpu [--batch 48] [--steps 16] [--repeats 5]

The recurrent memories decode through the fused recurrent functions. On the CPU these run the
token loop batched over all packed sequences (kernels/common/recurrent_torch.py, backend 'torch');
the per-sequence reference loop (backend 'naive'), which a MoM layer pays once per (memory,
sample) state, is timed on the same model for comparison. Best of ``repeats``, process CPU
time, one thread.
"""
from __future__ import annotations

import argparse
import time

import torch

MODELS = ("mom_lm", "gdn_lm", "gla_lm", "transformer_lm")


def build(name: str, backend: str):
    """The preset of conf/model/<name>.yaml, built as ``cltk run benchmark=mqar model=<name>``
    builds it (vocabulary 256), with the memories' kernel ``backend``; the language model
    inside the strategy-facing wrapper."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from cl_toolkit.runner import build_model, build_stream

    overrides = ["benchmark=mqar", f"model={name}"]
    if name != "transformer_lm":
        overrides.append(f"model.backend={backend}")
    with initialize_config_module("cl_toolkit.conf", version_base=None):
        cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    torch.manual_seed(0)
    return build_model(cfg, build_stream(cfg)).lm.eval()


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
    for name in MODELS:
        fast = step_seconds(build(name, "torch"), ids, args.steps, args.repeats)
        if name == "transformer_lm":
            print(f"| {name} | {1e3 * fast:.2f} | (no recurrence) | |")
            continue
        slow = step_seconds(build(name, "naive"), ids, args.steps, args.repeats)
        print(f"| {name} | {1e3 * fast:.2f} | {1e3 * slow:.2f} | {slow / fast:.1f}x |")


if __name__ == "__main__":
    main()
