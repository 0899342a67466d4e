"""KCL and GKCL against Avalanche's Replay and GenerativeReplay at the same memory in bytes.

Issue 3. One stream for every method: rotated Fashion-MNIST, task-il, in KCL's MNIST protocol
(10 classes per task, MLP 784-256-256 with dropout 0.5, batch 10, one epoch per task, SGD with
momentum 0.8, lr halved after each task). The settings are read from the experiment configs
``conf/experiment/kcl_rotated_fashion_mnist.yaml`` and ``gkcl_rotated_fashion_mnist.yaml``
(composed by Hydra as ``cltk run experiment=...`` does), reduced by the flags below. Every method
gets the same stream object (same tasks, angles, train / test subsets), the same seed before its
model is built, and is scored by our evaluator (`cl_toolkit.runner.evaluate`) after every task.

- ``kcl``, ``gkcl``: our strategies with the experiment configs' settings.
- ``avalanche Replay``: ``avalanche.training.Replay`` through our ``avalanche`` strategy adapter;
  ``mem_size`` (samples) = KCL's ``memory_bytes()`` after the last task / bytes of one sample
  (its input and label, counted as KCL counts its coreset). KCL reaches that budget at the last
  task; Replay holds it from the first.
- ``avalanche GenerativeReplay``: ``avalanche.training.GenerativeReplay`` with Avalanche's
  *default* generator, built as GenerativeReplay builds it when ``generator_strategy`` is None
  (``MlpVAE(input shape, nhid=2)``, Adam lr 0.01, weight decay 1e-4, ``VAETraining`` with a
  ``GenerativeReplayPlugin``, same batch size and epochs as the solver) but with a silent logger.
  Its memory is the VAE's parameters and buffers (about the size of GKCL's generator; both are
  printed).

Task-il and the heads. Every task of this stream has all 10 classes, so masking the logits to the
task's classes (our task-il evaluation with one head) changes nothing: a single-head model gets no
task information. KCL and GKCL use the task id (one kernel machine per task). GenerativeReplay
cannot use it: its replayed samples carry no task id (they are labelled by the old solver called
without one and tagged with the current task). So the Avalanche baselines use **one shared head
with task-masked evaluation** (a no-op here), consistently; one extra row runs Replay with a
**multi-head** model (one head per task, picked by the task id, in training, replay and
evaluation), the task-aware baseline that Replay supports.

The Avalanche baselines train at ``--baseline-lr`` (default 0.01, halved per task like KCL): at
KCL's lr 0.1 with momentum 0.8 and batch 10 our own naive/replay MLPs did not learn at all (see
RESULTS.md, "KCL protocol on rotated Fashion-MNIST, reduced").

Prints one markdown table: memory kept after the last task (bytes), ACC, BWT, max-based
forgetting (%), training time and wall time (training + evaluation after every task), mean ± std
over seeds.

    python -m perf.kcl_vs_avalanche --tasks 3 --max-train 2000 --max-test 1000
    python -m perf.kcl_vs_avalanche --smoke      # seconds
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from cl_toolkit import registry
from cl_toolkit.metrics import accuracy, backward_transfer, forgetting
from cl_toolkit.runner import build_model, build_stream, evaluate, seed_everything
from cl_toolkit.strategy import RunContext, tensor_bytes

CPU = torch.device("cpu")


def experiment(name: str, overrides: list[str]) -> dict:
    """The plain config of ``cltk run experiment=<name> <overrides>``."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("cl_toolkit.conf", version_base=None):
        cfg = compose("config", [f"experiment={name}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def run_method(stream, model_cfg: dict, make, seed: int, before_task=None):
    """Train ``make(stream)`` task by task; returns (strategy, accuracy matrix, train s, wall s)."""
    seed_everything(seed)
    model = build_model({"model": model_cfg}, stream)
    strategy = make(stream)
    strategy.setup(stream, model, RunContext(seed=seed,
                                             generator=torch.Generator().manual_seed(seed)))
    R, train_s, t0 = [], 0.0, time.perf_counter()
    for task in stream:
        if before_task is not None:
            before_task(strategy, task.index)
        t1 = time.perf_counter()
        strategy.learn(task)
        train_s += time.perf_counter() - t1
        R.append([evaluate(strategy, other, 1024, CPU) for other in stream])
    return strategy, R, train_s, time.perf_counter() - t0


def avalanche(cls: str, kwargs: dict, scfg: dict, lr: float):
    """Our ``avalanche`` strategy adapter around ``avalanche.training.<cls>``."""
    return lambda stream: registry.build(
        "strategy", "avalanche", cls=cls, kwargs=kwargs, epochs=scfg["epochs"],
        batch_size=scfg["batch_size"], lr=lr, optimizer=scfg["optimizer"],
        momentum=scfg["momentum"])


def lr_schedule(scfg: dict, lr: float):
    """KCL's per-task decay, lr_t = max(lr * lr_decay^(t + decay_first_task), lr_min), on
    Avalanche's optimizer."""
    shift = int(scfg.get("decay_first_task", False))

    def set_lr(strategy, t):
        for group in strategy.avl.optimizer.param_groups:
            group["lr"] = max(lr * scfg["lr_decay"] ** (t + shift), scfg["lr_min"])
    return set_lr


def default_generator(stream, scfg: dict):
    """Avalanche's default GenerativeReplay generator, as GenerativeReplay.__init__ builds it,
    with a silent evaluator (the default one prints progress bars)."""
    from avalanche.models.generator import VAE_loss, MlpVAE
    from avalanche.training import VAETraining
    from avalanche.training.plugins import EvaluationPlugin, GenerativeReplayPlugin

    vae = MlpVAE(tuple(stream.input_shape), nhid=2, device="cpu")
    opt = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=0.01,
                           weight_decay=0.0001)
    return VAETraining(model=vae, optimizer=opt, criterion=VAE_loss,
                       train_mb_size=scfg["batch_size"], train_epochs=scfg["epochs"],
                       eval_mb_size=1024, device="cpu", plugins=[GenerativeReplayPlugin()],
                       evaluator=EvaluationPlugin(loggers=[]))


def replay_buffer_len(strategy) -> int:
    from avalanche.training.plugins import ReplayPlugin

    plugin = next(p for p in strategy.avl.plugins if isinstance(p, ReplayPlugin))
    return len(plugin.storage_policy.buffer)


def quiet_avalanche_warnings() -> None:
    """Drop Avalanche's warnings about the silent evaluators and its own deprecated buffer API
    (the latter is raised under ``simplefilter("always")``, so a filter cannot catch it)."""
    warnings.filterwarnings("ignore", message="No loggers specified")
    show = warnings.showwarning

    def showwarning(message, category, filename, *args, **kwargs):
        if not (category is DeprecationWarning and "avalanche" in filename):
            show(message, category, filename, *args, **kwargs)

    warnings.showwarning = showwarning


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--max-train", type=int, default=2000, help="training images per task")
    p.add_argument("--max-test", type=int, default=1000, help="test images per task")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1")
    p.add_argument("--baseline-lr", type=float, default=0.01,
                   help="lr of the Avalanche baselines (KCL / GKCL use their configs' lr)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true",
                   help="2 tasks, 400 train / 200 test images, 1 seed (seconds)")
    args = p.parse_args(argv)
    if args.smoke:
        args.tasks, args.max_train, args.max_test, args.seeds = 2, 400, 200, 1
    torch.set_num_threads(args.threads)
    quiet_avalanche_warnings()
    reduce = [f"benchmark.n_tasks={args.tasks}", f"benchmark.max_train_per_task={args.max_train}",
              f"benchmark.max_test_per_task={args.max_test}"]
    kcl_cfg = experiment("kcl_rotated_fashion_mnist", reduce)
    gkcl_cfg = experiment("gkcl_rotated_fashion_mnist", reduce)
    assert kcl_cfg["benchmark"] == gkcl_cfg["benchmark"] and kcl_cfg["model"] == gkcl_cfg["model"]
    scfg, model_cfg = kcl_cfg["strategy"], kcl_cfg["model"]
    multi_cfg = {**model_cfg, "heads": "multi"}
    decay = lr_schedule(scfg, args.baseline_lr)

    def ours(cfg):
        kwargs = {k: v for k, v in cfg["strategy"].items() if k != "name"}
        return lambda stream: registry.build("strategy", cfg["strategy"]["name"], **kwargs)

    rows: dict[str, list] = {}
    for seed in range(args.seeds):
        stream = build_stream({**kcl_cfg, "seed": seed})
        x0, y0 = stream[0].train.x[0], stream[0].train.y[0]
        sample_bytes = tensor_bytes(x0, y0)
        results = {}
        s, *res = run_method(stream, model_cfg, ours(kcl_cfg), seed)
        budget = s.memory_bytes()
        results[f"kcl ({scfg['kernel']}, coreset {scfg['coreset_per_class']}/class)"] = \
            (budget, *res)
        s, *res = run_method(stream, model_cfg, ours(gkcl_cfg), seed)
        g = gkcl_cfg["strategy"]
        results[f"gkcl ({g['kernel']}, generator {g['generator_hidden']}, z {g['z_dim']})"] = \
            (s.memory_bytes(), *res)
        mem_size = budget // sample_bytes
        for heads, mcfg in (("single head", model_cfg), ("multi-head", multi_cfg)):
            s, *res = run_method(stream, mcfg, avalanche("Replay", {"mem_size": mem_size}, scfg,
                                                         args.baseline_lr), seed, decay)
            results[f"avalanche Replay ({mem_size} samples, {heads})"] = \
                (replay_buffer_len(s) * sample_bytes, *res)

        def gr(stream):
            return avalanche("GenerativeReplay",
                             {"generator_strategy": default_generator(stream, scfg)}, scfg,
                             args.baseline_lr)(stream)

        s, *res = run_method(stream, model_cfg, gr, seed, decay)
        vae = s.avl.generator_strategy.model
        results["avalanche GenerativeReplay (default MlpVAE, single head)"] = \
            (tensor_bytes(*vae.parameters(), *vae.buffers()), *res)
        for name, (mem, R, train_s, wall_s) in results.items():
            rows.setdefault(name, []).append(
                (mem, 100 * accuracy(R), 100 * (backward_transfer(R) or 0.0),
                 100 * (forgetting(R) or 0.0), train_s, wall_s))
            print(f"seed {seed}: {name}: ACC {100 * accuracy(R):.2f}, "
                  f"{train_s:.0f} s training", flush=True)

    print(f"\nrotated_fashion_mnist, task-il, {args.tasks} tasks, {args.max_train} train / "
          f"{args.max_test} test images per task, {args.seeds} seed(s), {torch.get_num_threads()} "
          f"thread(s); Avalanche baselines at lr {args.baseline_lr}\n")
    print("| method | memory (bytes) | ACC (%) | BWT (%) | Forgetting (%) | train (s) | "
          "wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        a = np.array(runs, dtype=float)
        mean, std = a.mean(0), a.std(0)
        cells = [f"{mean[i]:.2f} ± {std[i]:.2f}" if args.seeds > 1 else f"{mean[i]:.2f}"
                 for i in (1, 2, 3)]
        print(f"| {name} | {int(mean[0]):,} | {' | '.join(cells)} | {mean[4]:.1f} | "
              f"{mean[5]:.1f} |")


if __name__ == "__main__":
    main()
