"""Issue 25 speed check: frames per second of GDKVM and its three ablations at one input size,
and the cost of the memory alone against STM's as clips get longer, side by side in one run.

Part 1 (``fps``): eval forward passes (no gradient) of gdkvm, linear_kvm, stm and frame_unet
(cl_toolkit/models/video.py) on the same clip ``[batch, frames, 1, size, size]``; the models
alternate within each repeat (ABCD ABCD ...) so that a shared machine's load falls on all alike,
and the best repeat of each is kept. Frames per second = batch x frames / seconds.

Part 2 (``memory``): the memory's own work over a clip of T frames (each frame: read with its
queries, then write its keys and values; the encoder and decoder, the same per frame for every
model, are left out), on random unit keys at the model's token grid, for T in ``--lengths``:
milliseconds per clip and the bytes the memory holds after the clip (measured on the tensors).
GDKVM's state is a d x d matrix per head whatever T (time linear in T), STM keeps every frame's
keys and values and reads them all (memory linear, time quadratic in T).

    OMP_NUM_THREADS=1 python -m perf.gdkvm_speed [--size 64 --frames 8 --lengths 8 16 32 64]
    python3 perf/gdkvm_speed.py --device cuda --backend triton     # GPU (perf/gpu_kernels.sh)

On a GPU, ``--backend triton`` runs GDKVM's writes (and linear_kvm's) through our Triton chunk
kernels ('auto' does too on CUDA); times are taken after ``torch.cuda.synchronize()``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _import_video():
    """cl_toolkit.models.video from an install, else from this checkout with its ``kernels/``
    mapped to ``cl_toolkit.kernels`` (the GPU machine has the checkout but not the install)."""
    try:
        from cl_toolkit.models import video
        return video
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "cl_toolkit" or m.startswith("cl_toolkit.")]:
        del sys.modules[name]
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    import cl_toolkit
    shim = tempfile.mkdtemp(prefix="cltk_shim_")
    os.symlink(root / "kernels", os.path.join(shim, "kernels"))
    cl_toolkit.__path__.append(shim)
    from cl_toolkit.models import video
    return video


video = _import_video()
MODELS = ("gdkvm", "linear_kvm", "stm", "frame_unet")


class _Stream:
    """The fields the model builders read from a clip segmentation stream."""

    def __init__(self, frames, size, num_classes):
        self.name, self.kind, self.num_classes = "speed", "segmentation", num_classes
        self.input_shape = (frames, 1, size, size)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _interleaved_best(fns: dict, repeats: int, device) -> dict:
    """Best seconds per call of each fn, the fns alternating within each repeat."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():          # warm-up: first-call allocations, kernel compilation
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def fps(args, device) -> dict:
    stream = _Stream(args.frames, args.size, 2)
    x = torch.rand(args.batch, args.frames, 1, args.size, args.size, device=device)
    models = {}
    for name in MODELS:
        torch.manual_seed(0)
        kw = {"backend": args.backend} if name in ("gdkvm", "linear_kvm") else {}
        models[name] = getattr(video, name)(stream, hidden=args.hidden, heads=args.heads,
                                            **kw).to(device).eval()

    def run(m):
        with torch.no_grad():
            m(x)
    secs = _interleaved_best({k: (lambda m=m: run(m)) for k, m in models.items()},
                             args.repeats, device)
    frames = args.batch * args.frames
    return {k: {"ms_per_clip": 1e3 * s / args.batch, "fps": frames / s,
                "params": sum(p.numel() for p in models[k].parameters())}
            for k, s in secs.items()}


def _held_bytes(state) -> int:
    if state is None:
        return 0
    parts = state if isinstance(state, tuple) else (state,)
    return sum(t.numel() * t.element_size() for t in parts)


def memory_cost(args, device) -> list[dict]:
    """Read + write over a clip of T frames for the GDR, linear and STM memories."""
    heads, d = args.heads, args.hidden // args.heads
    N = (args.size // video.STRIDE) ** 2
    mems = {"gdkvm": video.GDRMemory(args.backend), "linear_kvm": video.LinearMemory(args.backend),
            "stm": video.STMMemory()}
    g = torch.Generator().manual_seed(0)
    rows = []
    for T in args.lengths:
        keys = F.normalize(torch.randn(T, args.batch, N, heads, d, generator=g), dim=-1).to(device)
        vals = torch.randn(T, args.batch, N, heads, d, generator=g).to(device)
        gate = torch.full((args.batch, heads), -0.1, device=device)
        beta = torch.full((args.batch, heads), 0.5, device=device)
        held = {}

        def clip(mem, name, T=T, keys=keys, vals=vals, gate=gate, beta=beta, held=held):
            state = None
            with torch.no_grad():
                for t in range(T):
                    q = mem.keys(keys[t]).contiguous()
                    mem.read(state, q)
                    state = mem.write(state, q, vals[t], gate, beta)
            held[name] = _held_bytes(state)
        secs = _interleaved_best({k: (lambda m=m, k=k: clip(m, k)) for k, m in mems.items()},
                                 args.repeats, device)
        row = {"T": T, "tokens_per_frame": N}
        for k in mems:
            row[f"{k}_ms"] = 1e3 * secs[k]
            row[f"{k}_bytes"] = held[k]
        row["stm_over_gdkvm_time"] = secs["stm"] / secs["gdkvm"]
        row["stm_over_gdkvm_bytes"] = held["stm"] / held["gdkvm"]
        rows.append(row)
    return rows


def table(out: dict) -> str:
    lines = [(f"device {out['device']}, backend {out['backend']}, clip [{out['batch']}, "
              f"{out['frames']}, 1, {out['size']}, {out['size']}], hidden {out['hidden']}, "
              f"heads {out['heads']}, threads {out['threads']}"), "",
             "| model | params | ms / clip | frames / s |", "|---|---|---|---|"]
    for k, r in out["fps"].items():
        lines.append(f"| {k} | {r['params']} | {r['ms_per_clip']:.1f} | {r['fps']:.1f} |")
    lines += ["", "memory alone (read + write every frame), per clip:", "",
              ("| T | gdkvm ms | linear_kvm ms | stm ms | stm / gdkvm time | gdkvm bytes | "
               "stm bytes | stm / gdkvm bytes |"), "|---|---|---|---|---|---|---|---|"]
    for r in out["memory"]:
        lines.append(f"| {r['T']} | {r['gdkvm_ms']:.2f} | {r['linear_kvm_ms']:.2f} | "
                     f"{r['stm_ms']:.2f} | {r['stm_over_gdkvm_time']:.2f} | {r['gdkvm_bytes']} | "
                     f"{r['stm_bytes']} | {r['stm_over_gdkvm_bytes']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="frame height = width (multiple of 4)")
    ap.add_argument("--frames", type=int, default=8, help="clip length of the fps part")
    ap.add_argument("--batch", type=int, default=1, help="clips per forward")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--backend", default="auto", choices=video.BACKENDS,
                    help="kernel backend of gdkvm / linear_kvm ('auto': triton on CUDA)")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "backend": args.backend, "size": args.size, "frames": args.frames,
           "batch": args.batch, "hidden": args.hidden, "heads": args.heads,
           "threads": args.threads}
    out["fps"] = fps(args, device)
    out["memory"] = memory_cost(args, device)
    print(table(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
