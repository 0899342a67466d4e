"""OPCM merge speed on ViT-B/32-shaped image-tower weights (random), on the CPU.

Prints one table: for each way of computing the projection, the time of one OPCM step (step 2:
project tau_2 against S_1 = tau_1), the relative Frobenius error of the resulting S_2 in the
worst projected weight against the float64-SVD reference, and the peak resident memory during
the step in model-sized buffers (theta_0, S and the incoming model make 3; the rest is the
step's temporaries, measured with the kernel's peak-RSS counter); then the time and peak of a
whole 8-model stream with the library's path. Every row runs in a fresh subprocess so peaks do not
mix. Weights: open_clip ``create_model('ViT-B-32', pretrained=None).visual`` (87.8M parameters;
72 projected matrices: q, k, v, out, fc, proj of 12 blocks), task vectors with a 1/k singular
value decay, as fine-tuning updates have.

    python -m perf.merge_speed            # full table (minutes)
    python -m perf.merge_speed --blocks 2 # quick look

Ways (``--ways``): ``fast`` = `opcm.project_` (float64 Gram + eigh, float32 products, one
single-threaded matrix per thread, each written back into tau at once; the strategy's path),
``fast-serial`` = the same one matrix after the other with multi-threaded BLAS / LAPACK,
``fast-f32`` = the same as ``fast`` with a float32 Gram, ``svd-f32`` = one thin float32 LAPACK
SVD per matrix (the plain approach), ``svd-f32-threads`` = the same SVDs side by side, one
single-threaded call per thread (multi-threaded LAPACK collapses when another job holds a
core, so this is the baseline that survives a shared machine), ``exact`` = float64 thin SVD
(`project_exact`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

WAYS = ("fast", "fast-serial", "fast-f32", "svd-f32", "svd-f32-threads", "exact")


def vit_shapes(blocks: int) -> dict[str, list[int]]:
    """Shapes of the floating entries of open_clip ViT-B/32's image tower (first ``blocks``)."""
    import open_clip

    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual
    keep = tuple(f"transformer.resblocks.{i}." for i in range(blocks))
    return {k: list(v.shape) for k, v in visual.state_dict().items() if v.is_floating_point()
            and (not k.startswith("transformer.resblocks.") or k.startswith(keep))}


def linear_keys(state) -> dict[str, int]:
    return {k: 3 if k.endswith("in_proj_weight") else 1 for k in state
            if k.endswith(("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight"))}


def random_tv(state, seed: int) -> dict[str, torch.Tensor]:
    """Task vector with singular values decaying as 1/k in every matrix, norm ~1e-3 per entry."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        t = torch.randn(v.shape, generator=g) * 1e-3
        if t.dim() == 2 and min(t.shape) > 1:
            n = min(t.shape)
            scale = torch.rsqrt(torch.arange(1, n + 1, dtype=torch.float32))  # sqrt(1/k)
            a = torch.randn(t.shape[0], n, generator=g) * scale
            t = (a @ torch.randn(n, t.shape[1], generator=g)) * (1e-3 / math.sqrt(n))
        out[k] = t
    return out


def svd_project_(s, t, alpha, dtype):
    """In place: ``t`` becomes ``P(t)``, from a thin LAPACK SVD of ``s`` in ``dtype``."""
    from cl_toolkit.merging.opcm import RTOL, split_rank

    U, sigma, Vh = torch.linalg.svd(s.to(dtype), full_matrices=False)
    keep = int((sigma > RTOL * sigma[0]).sum())
    U, sigma, V = U[:, :keep], sigma[:keep], Vh[:keep].T
    r = split_rank(sigma, alpha)
    X = t.to(dtype) @ V
    d = (U * X).sum(0)
    B = U[:, :r].T @ X[:, :r]
    B.fill_diagonal_(0)
    t.copy_(t.to(dtype) - (U * d) @ V.T - U[:, :r] @ B @ V[:, :r].T)


def side_by_side(fn, items):
    """``fn`` over ``items``, one single-threaded call per torch thread (as `opcm` does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)


def step(update, tau, norms, way, linear, alpha=0.5):
    """One OPCM step with the projection computed ``way``; in place like `opcm_step_`."""
    from cl_toolkit.merging import opcm
    from cl_toolkit.merging.task_vectors import norm

    if way == "fast":
        return opcm.opcm_step_(update, tau, norms, alpha, linear)
    if way == "fast-serial":
        return opcm.opcm_step_(update, tau, norms, alpha, linear, workers=1)
    if way == "fast-f32":
        return opcm.opcm_step_(update, tau, norms, alpha, linear, gram_dtype=torch.float32)
    norms.append(norm(tau))
    pairs = [(a, b) for k, c in linear.items() if k in tau
             for a, b in zip(update[k].view(c, -1, update[k].shape[-1]),
                             tau[k].view(c, -1, tau[k].shape[-1]))]
    if way == "svd-f32":
        for s, t in pairs:
            svd_project_(s, t, alpha, torch.float32)
    elif way == "svd-f32-threads":
        side_by_side(lambda p: svd_project_(*p, alpha, torch.float32), pairs)
    else:
        for s, t in pairs:
            t.copy_(opcm.project_exact(s, t, alpha))
    for k, t in tau.items():
        update[k].add_(t)
    return opcm.merge_scale(update, norms)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(way: str, shapes_path: str, models: int, out_path: str | None) -> dict:
    """Run in a fresh process: ``models`` OPCM steps. Per step: the fine-tuned model arrives
    (a model-sized buffer), becomes tau in place, is folded into S, and the merged model is
    written back into the same buffer; theta_0 and S are the other two buffers."""
    from cl_toolkit.merging.task_vectors import combine_into_, subtract_

    with open(shapes_path) as f:
        shapes = json.load(f)
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    linear = linear_keys(base)
    size_mb = sum(v.numel() * v.element_size() for v in base.values()) / 2 ** 20
    update, norms, times, extra = {}, [], [], 0.0
    for i in range(models):
        model = random_tv(base, i)
        for k, v in model.items():
            v.add_(base[k])  # the fine-tuned model theta_0 + tau_i
        reset_peak()
        before = _status_mb("VmRSS")
        t0 = time.perf_counter()
        tau = subtract_(model, base)
        if i == 0:
            update = {k: v.clone() for k, v in tau.items()}
            norms.append(math.sqrt(sum(float(v.double().square().sum()) for v in tau.values())))
            lam = 1.0
        else:
            lam = step(update, tau, norms, way, linear)
        combine_into_(model, base, update, 1.0 / lam)  # the merged model, in the same buffer
        times.append(time.perf_counter() - t0)
        if i > 0:
            # resident before the step: theta_0, S, the incoming model (+ the interpreter)
            extra = max(extra, (_status_mb("VmHWM") - before) / size_mb)
        if out_path and i == 1:
            torch.save({k: update[k] for k in linear}, out_path)
        del model, tau
    return {"way": way, "models": models, "step_s": times[1], "stream_s": sum(times),
            "size_mb": size_mb, "buffers": 3 + extra}


def run_child(way, shapes_path, models, out_path):
    cmd = [sys.executable, "-m", "perf.merge_speed", "--child", way,
           "--shapes", shapes_path, "--models", str(models), "--save", out_path]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{way} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=12, help="transformer blocks to keep (12)")
    ap.add_argument("--models", type=int, default=8, help="models in the stream row (8)")
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--child", choices=WAYS)
    ap.add_argument("--save", default="")
    ap.add_argument("--shapes", default="", help="JSON {key: shape} instead of open_clip")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.shapes, args.models, args.save or None)))
        return
    import tempfile

    tmp = tempfile.mkdtemp()
    shapes = args.shapes
    if not shapes:
        shapes = os.path.join(tmp, "shapes.json")
        with open(shapes, "w") as f:
            json.dump(vit_shapes(args.blocks), f)
    ways = args.ways.split(",")
    rows = {w: run_child(w, shapes, 2, os.path.join(tmp, f"{w}.pt")) for w in ways}
    S = {w: torch.load(os.path.join(tmp, f"{w}.pt")) for w in ways}
    ref = S.get("exact")
    with open(shapes) as f:
        blocks = len({k.split(".")[2] for k in json.load(f) if k.startswith("transformer.resb")})
    print(f"OPCM on ViT-B/32 image-tower shapes ({blocks} blocks, "
          f"{rows[ways[0]]['size_mb']:.0f} MB per model), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'way':15s} {'step s':>8s} {'max rel err of S_2':>19s} "
          f"{'peak model-sized buffers':>25s}")
    for w in ways:
        r = rows[w]
        if ref is None:
            err = "n/a"
        else:
            err = f"{max(float((S[w][k] - ref[k]).norm() / ref[k].norm()) for k in ref):.1e}"
        print(f"{w:15s} {r['step_s']:8.2f} {err:>19s} {r['buffers']:25.2f}")
    if args.models > 2:
        r = run_child("fast", shapes, args.models, "")
        print(f"stream of {args.models} models (fast): {r['stream_s']:.1f} s in all, "
              f"{r['stream_s'] / args.models:.2f} s per model, peak "
              f"{r['buffers']:.2f} model-sized buffers")


if __name__ == "__main__":
    main()
