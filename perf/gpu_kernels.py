"""GPU check and benchmark of cl_toolkit.kernels in one run (a benchmark, not a test).

1. Correctness on the GPU: our Triton chunk kernels (gated delta rule, gated linear attention,
   the MoM layer) in bf16 and fp32, forward and every input gradient, against float64
   references (the naive token loop at T ~ 1000 with a varlen layout, also with a strong
   decay in every sequence's last chunk; the torch chunk path at T = 2048).
   flash-linear-attention's kernel, when its wheels are importable, is measured against the
   same reference at T = 2048 as a yardstick.
2. Only if every check passes: forward and forward+backward times (median of CUDA events)
   at (B, T, H, D) in {(8, 2048, 16, 128), (4, 4096, 16, 128), (1, 16384, 16, 128)}, bf16,
   against our naive/torch paths, causal SDPA, and fla's chunk_gated_delta_rule and
   MomAttention; plus the minimum-IO bandwidth of our forward against a measured copy.

Times are queued (CUDA events around each call, calls back to back, one sync at the end: GPU
time as in a training loop) with the synchronised per-call time alongside. fla 0.6.0 refuses
its gated backward on Hopper under Triton < 3.7.1 (its issue #640); the guard is switched off
so the backward is timed, and fla's gradients are checked in the same table.
``--ours-only --fla-ref FILE`` times only our gdr kernels and takes fla's rows from an earlier
run on the same machine.
``--profile`` writes per-kernel times of our gdr and of the MoM layer to gpu_profile.txt.

Prints a markdown table and writes gpu_kernels.md / gpu_kernels.json under --out ($OUT).
Exit status 1 when a correctness check fails (then no timings or speedups are reported).
``--smoke`` runs everything at toy sizes on CPU under TRITON_INTERPRET=1 (checks the script);
``--compile-check bf16`` builds every kernel at every autotune config for sm_90 without a GPU and
prints shared memory, registers and spill bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

T_START = time.time()


def _import_kernels():
    """cl_toolkit.kernels and cl_toolkit.layers from an install, else straight from this
    checkout via a shim package (the GPU machine has the checkout but not the install)."""
    try:
        import cl_toolkit.kernels as K  # noqa: F401
        import cl_toolkit.kernels.common.chunk_triton  # noqa: F401
        import cl_toolkit.layers  # noqa: F401
        return K
    except ImportError:
        pass
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    shim = tempfile.mkdtemp(prefix="cltk_shim_")
    os.makedirs(os.path.join(shim, "cl_toolkit"))
    open(os.path.join(shim, "cl_toolkit", "__init__.py"), "w").close()
    os.symlink(os.path.join(root, "kernels"), os.path.join(shim, "cl_toolkit", "kernels"))
    os.symlink(os.path.join(root, "cl_toolkit", "layers"),
               os.path.join(shim, "cl_toolkit", "layers"))
    sys.path.insert(0, shim)
    for name in [m for m in sys.modules if m == "cl_toolkit" or m.startswith("cl_toolkit.")]:
        del sys.modules[name]
    import cl_toolkit.kernels as K
    return K


K = _import_kernels()
from cl_toolkit.kernels.gated_delta_rule import (chunk_gated_delta_rule,  # noqa: E402
                                                 naive_gated_delta_rule)
from cl_toolkit.kernels.linear_attn import chunk_linear_attn, naive_linear_attn  # noqa: E402
from cl_toolkit.layers.mom import MoMLayer  # noqa: E402

try:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gdr
    FLA_ERR = None
except Exception as exc:  # pragma: no cover - depends on carried wheels
    fla_chunk_gdr, FLA_ERR = None, f"{type(exc).__name__}: {exc}"
try:
    from fla.layers.mom import MomAttention as FlaMomAttention
    FLA_MOM_ERR = None
except Exception as exc:  # pragma: no cover
    FlaMomAttention, FLA_MOM_ERR = None, f"{type(exc).__name__}: {exc}"

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def bypass_fla_640() -> bool:
    """fla 0.6.0 refuses its gated backward on Hopper under Triton 3.4-3.7.0 (its issue #640:
    that compiler gets one backward kernel wrong there), which leaves nothing to compare our
    forward+backward with on such an image. Switch the guard off to time it anyway; the
    correctness table then shows how far its gradients are off. True when switched off."""
    try:
        import fla.ops.common.chunk_o as chunk_o
    except Exception:
        return False
    if getattr(chunk_o, "TRITON_ABOVE_3_7_1", True):
        return False
    chunk_o.TRITON_ABOVE_3_7_1 = True
    return True


def elapsed() -> float:
    return time.time() - T_START


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, dev, warmup=2, reps=15, max_s=8.0) -> tuple[float, float]:
    """Median milliseconds per call of fn(): (queued, synced).

    queued: calls back to back with CUDA events around each and one sync at the end, as in a
    training loop; host work overlaps the GPU's, so this is the GPU time unless the host is the
    slower side. synced: a sync after every call, so the host's launch work is counted too.
    On CPU both are wall-clock times of single calls.
    """
    if SMOKE:
        warmup, reps = 1, 2
    for _ in range(warmup):
        fn()
    sync(dev)
    synced = []
    while len(synced) < reps:
        t0 = time.perf_counter()
        fn()
        sync(dev)
        synced.append((time.perf_counter() - t0) * 1e3)
        if sum(synced) > max_s * 1e3 / 2:
            break
    if dev.type != "cuda":
        return statistics.median(synced), statistics.median(synced)
    n = len(synced)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    queued = statistics.median(start.elapsed_time(end) for start, end in events)
    return queued, statistics.median(synced)


def make_inputs(B, T, H, K_, V, dev, dtype, n=None, h0=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    x = dict(q=r(B, T, H, K_), k=F.normalize(r(B, T, H, K_), dim=-1), v=r(B, T, H, V),
             g=F.logsigmoid(r(B, T, H)) / 8, beta=torch.sigmoid(r(B, T, H)),
             initial_state=r(n or B, H, V, K_) * 0.1 if h0 else None)
    return {k: (t.to(dev, dtype if k in ("q", "k", "v", "beta") else torch.float32)
                if t is not None else None) for k, t in x.items()}


def fwd_bwd(fn, x, do, dht):
    leaves = {k: t.detach().clone().requires_grad_() for k, t in x.items() if t is not None}
    args = {k: leaves.get(k) for k in x}
    h0 = args.pop("initial_state")
    o, s = fn(**args, initial_state=h0)
    ((o.float() * do.float()).sum() + (s.float() * dht.float()).sum()).backward()
    return o, s, {k: t.grad for k, t in leaves.items() if t.grad is not None}


def check_op(name, ours, ref, x, dtype, yardstick=None, cu=None):
    """Errors of ours (and the yardstick) against ref on float64 copies; one row per tensor."""
    B, T, H, K_ = x["q"].shape
    V = x["v"].shape[-1]
    n = x["initial_state"].shape[0]
    gen = torch.Generator(device="cpu").manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen).to(x["q"].device)
    dht = torch.randn(n, H, V, K_, generator=gen).to(x["q"].device)
    kw = dict(cu_seqlens=cu, output_final_state=True)
    try:
        o, s, gr = fwd_bwd(lambda **a: ours(**a, **kw), x, do, dht)
    except Exception as exc:  # a compile error on this Triton fails the check, not the run
        traceback.print_exc()
        return [dict(check=name, dtype=str(dtype)[6:], tensor="all", err=float("inf"),
                     fla_err=f"{type(exc).__name__}: {str(exc)[:200]}", ok=False)]
    x64 = {k: t.double() if t is not None else None for k, t in x.items()}
    o2, s2, gr2 = fwd_bwd(lambda **a: ref(**a, **kw), x64, do, dht)
    errs = {"o": rel(o, o2), "final": rel(s, s2)}
    errs.update({"d" + k: rel(gr[k], gr2[k]) for k in gr2 if k in gr})
    ys = {}
    if yardstick is not None:
        try:
            o3, s3, gr3 = fwd_bwd(lambda **a: yardstick(**a, **kw), x, do, dht)
            ys = {"o": rel(o3, o2), "final": rel(s3, s2)}
            ys.update({"d" + k: rel(gr3[k], gr2[k]) for k in gr2 if k in gr3})
        except Exception as exc:
            ys = {"error": f"{type(exc).__name__}: {exc}"}
    rows = []
    for t, e in errs.items():
        y = ys.get(t)
        # Pass: within the fixed tolerance, or no worse than 2x fla's own error on this tensor.
        ok = e <= TOL[dtype] or (isinstance(y, float) and e <= 2 * y)
        rows.append(dict(check=name, dtype=str(dtype)[6:], tensor=t, err=e, fla_err=y, ok=ok))
    if "error" in ys:
        rows.append(dict(check=name, dtype=str(dtype)[6:], tensor="fla", err=float("nan"),
                         fla_err=ys["error"], ok=True))
    # Where a fresh machine's minutes go (mostly compiling and tuning kernels).
    print(f"[{elapsed():6.1f}s] checked {name} {str(dtype)[6:]}", flush=True)
    return rows


def fla_gdr(q, k, v, g, beta, initial_state=None, output_final_state=False, cu_seqlens=None):
    """fla's kernel behind our signature: its state is [N, H, K, V], ours [N, H, V, K]."""
    h0 = initial_state.transpose(-1, -2).contiguous() if initial_state is not None else None
    o, s = fla_chunk_gdr(q, k, v, g, beta, scale=q.shape[-1] ** -0.5, initial_state=h0,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return o, (s.transpose(-1, -2) if s is not None else None)


def check_shapes(smoke: bool, dtype):
    """(B, T, H, K, V) of the varlen check, its cu_seqlens, and (B, T, H, K, V) of the large
    check. fp32 Triton kernels support K <= 64 (shared memory), so fp32 is checked at D = 64."""
    if smoke:
        return (1, 40, 2, 16, 16), [0, 7, 7, 33, 40], (1, 70, 2, 16, 16)
    D = 64 if dtype == torch.float32 else 128
    return (1, 1000, 4, D, D), [0, 100, 100, 613, 1000], (2, 2048, 16, D, D)


def strong_last_chunks(cu, H, dev, chunk=64):
    """g = -0.05 per token, but the last (up to 8) tokens of every sequence's last chunk
    decay by -200 in all: exp(G_t - G_i) past float32's range for a padding row t once gave
    NaN gradients. (A whole sequence that strongly decayed would leave dg at float32's
    rounding of the reverse cumsum: its true values are ~exp(-25).)"""
    g = torch.full((1, cu[-1], H), -0.05)
    for s, e in zip(cu[:-1], cu[1:]):
        if e > s:
            r = min(8, (e - s - 1) % chunk + 1)
            g[0, e - r:e] = -200.0 / r
    return g.to(dev)


def triton_gdr(**a):
    return chunk_gated_delta_rule(**a, backend="triton")


def triton_la(**a):
    return chunk_linear_attn(**{k: v for k, v in a.items() if k != "beta"}, backend="triton")


def correctness(dev, smoke, quick=False, fla_check=True):
    rows = []
    torch_gdr = lambda **a: chunk_gated_delta_rule(**a, backend="torch")
    naive_la = lambda **a: naive_linear_attn(**{k: v for k, v in a.items() if k != "beta"})
    torch_la = lambda **a: chunk_linear_attn(**{k: v for k, v in a.items() if k != "beta"},
                                             backend="torch")
    yard = fla_gdr if (fla_chunk_gdr is not None and dev.type == "cuda" and fla_check) else None
    dtypes = (torch.float32,) if smoke else ((torch.bfloat16,) if quick else
                                              (torch.bfloat16, torch.float32))
    for dtype in dtypes:
        sm, cu_small, bg = check_shapes(smoke, dtype)
        B, T, H, K_, V = sm
        cu = torch.tensor(cu_small, device=dev)
        x = make_inputs(B, T, H, K_, V, dev, dtype, n=cu.numel() - 1)
        # fla as yardstick where it matters: bf16 at the timed shape class (its varlen build
        # would be one more full compile and autotune of fla's kernels, minutes of a lease).
        y_d = yard if dtype == torch.bfloat16 else None
        rows += check_op(f"gdr varlen T={T} vs naive fp64", triton_gdr, naive_gated_delta_rule,
                         x, dtype, None, cu)
        rows += check_op(f"gla varlen T={T} vs naive fp64", triton_la, naive_la, x, dtype, None,
                         cu)
        x["g"] = strong_last_chunks(cu_small, H, dev)
        rows += check_op(f"gdr varlen T={T} strong decay vs naive fp64", triton_gdr,
                         naive_gated_delta_rule, x, dtype, None, cu)
        rows += check_op(f"gla varlen T={T} strong decay vs naive fp64", triton_la, naive_la, x,
                         dtype, None, cu)
        B, T, H, K_, V = bg
        x = make_inputs(B, T, H, K_, V, dev, dtype)
        rows += check_op(f"gdr B={B} T={T} H={H} D={K_} vs torch-chunk fp64", triton_gdr,
                         torch_gdr, x, dtype, y_d)
        if not quick:
            rows += check_op(f"gla B={B} T={T} H={H} D={K_} vs torch-chunk fp64", triton_la,
                             torch_la, x, dtype)
        print(f"[{elapsed():6.1f}s] correctness {dtype} done", flush=True)
    # MoM layer: Triton backend against the torch backend in float64, output and gradients.
    torch.manual_seed(0)
    layer, T = mom_check_layer(smoke)
    layer = layer.to(dev)
    hidden = layer.hidden_size
    ref_layer = MoMLayer(hidden, num_heads=4, num_memories=4, topk=2, backend="torch",
                         chunk_size=16 if smoke else 64).to(dev).double()
    ref_layer.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    xm = torch.randn(2, T, hidden, device=dev)
    dy = torch.randn(2, T, hidden, device=dev)
    got = {}
    check = f"MoM layer fp32 triton vs torch fp64 (T={T})"
    try:
        for name, mod, xin in (("ours", layer, xm), ("ref", ref_layer, xm.double())):
            xin = xin.clone().requires_grad_()
            y, _, _ = mod(xin)
            (y * dy.to(y.dtype)).sum().backward()
            got[name] = dict(y=y, dx=xin.grad, **{
                "d" + n: p.grad for n, p in mod.named_parameters()
                if n in ("k_proj", "v_proj", "A_log", "k_conv")})
    except Exception as exc:  # fail this check, keep the others' results
        traceback.print_exc()
        return rows + [dict(check=check, dtype="float32", tensor="all", err=float("inf"),
                            fla_err=f"{type(exc).__name__}: {str(exc)[:200]}", ok=False)]
    for tensor, ref in got["ref"].items():
        e = rel(got["ours"][tensor], ref)
        rows.append(dict(check=check, dtype="float32", tensor=tensor, err=e, fla_err=None,
                         ok=e <= 1e-4))
    print(f"[{elapsed():6.1f}s] checked {check}", flush=True)
    return rows


def mom_check_layer(smoke: bool):
    """The fp32 MoM layer of the correctness check, and its sequence length."""
    hidden, T = (32, 40) if smoke else (256, 512)
    return MoMLayer(hidden, num_heads=4, num_memories=4, topk=2, backend="triton",
                    chunk_size=16 if smoke else 64), T


WARM_PARTS = ("gdr-bf16", "gla-bf16", "gdr-fp32", "gla-fp32", "sizes", "mom", "fla", "fla-mom")


def warm(part: str, dev, smoke: bool) -> None:
    """Make the calls of one part of this script once (results thrown away), so that Triton
    builds and tunes their kernels into its on-disk cache. gpu_kernels.sh runs the parts as
    parallel processes before the main run, which then finds the kernels built: a fresh
    machine otherwise spends most of its minutes compiling one kernel config after another."""
    dtype = torch.float32 if (smoke or part.endswith("fp32")) else torch.bfloat16

    def exercise(fn, x, cu=None):
        B, T, H, _ = x["q"].shape
        n, _, V, K_ = x["initial_state"].shape
        fwd_bwd(lambda **a: fn(**a, cu_seqlens=cu, output_final_state=True), x,
                torch.randn(B, T, H, V, device=dev), torch.randn(n, H, V, K_, device=dev))

    if part in ("gdr-bf16", "gla-bf16", "gdr-fp32", "gla-fp32", "fla"):
        fn = {"gdr": triton_gdr, "gla": triton_la, "fla": fla_gdr}[part[:3]]
        sm, cu_small, bg = check_shapes(smoke, dtype)
        if part != "fla":  # fla is the yardstick at the large shape only
            cu = torch.tensor(cu_small, device=dev)
            exercise(fn, make_inputs(*sm, dev, dtype, n=cu.numel() - 1), cu)
        exercise(fn, make_inputs(*bg, dev, dtype))
    if part in ("sizes", "fla"):
        for B, T, H, D in timing_sizes(smoke):
            x = make_inputs(B, T, H, D, D, dev, dtype, h0=False)
            do = torch.randn(B, T, H, D, device=dev, dtype=dtype)
            fns = ((lambda **a: fla_gdr(**a)[0],) if part == "fla" else
                   (lambda **a: triton_gdr(**a)[0], lambda **a: triton_la(**a)[0]))
            for fn in fns:
                for call in timed_pair(fn, x, do):
                    call()
    if part == "mom":
        layer, T = mom_check_layer(smoke)
        layer.to(dev)(torch.randn(2, T, layer.hidden_size, device=dev,
                                  requires_grad=True))[0].sum().backward()
        layer = our_mom(smoke).to(dev, dtype)
    elif part == "fla-mom":
        _, _, hidden, heads, hd = mom_shape(smoke)
        layer = FlaMomAttention(hidden_size=hidden, head_dim=hd, num_heads=heads, expand_v=1,
                                num_memories=4, topk=2, shared_mem=True).to(dev, dtype)
    if part in ("mom", "fla-mom"):
        B, T, hidden, _, _ = mom_shape(smoke)
        layer(torch.randn(B, T, hidden, device=dev, dtype=dtype, requires_grad=True))[0] \
            .float().sum().backward()
    sync(dev)
    print(f"[{elapsed():6.1f}s] warmed {part}", flush=True)


def timing_sizes(smoke: bool):
    """(B, T, H, D) of the timed gdr / gla calls."""
    return [(2, 64, 2, 16)] if smoke else [(8, 2048, 16, 128), (4, 4096, 16, 128),
                                           (1, 16384, 16, 128)]


def copy_ceiling(dev) -> float:
    """GB/s of a large device-to-device copy, counting bytes read + written."""
    n = (1 << 28) if dev.type == "cuda" else (1 << 20)
    a = torch.empty(n, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), dev, reps=10)[0]
    return 2 * a.numel() * 4 / (ms * 1e-3) / 1e9


def timed_pair(fn, x: dict, do: torch.Tensor):
    """(forward, forward+backward) closures over ``fn(**x)`` for the timer; the backward pass
    uses fresh leaf copies so every call sees the same inputs."""
    def fwd():
        with torch.no_grad():
            fn(**x)
    leaves = {k: t.detach().clone().requires_grad_() for k, t in x.items() if t is not None}

    def fwdbwd():
        for t in leaves.values():
            t.grad = None
        fn(**{k: leaves.get(k) for k in x}).backward(do)
    return fwd, fwdbwd


def timings(dev, smoke, budget_s, ours_only=False, mom_only=False, mom_baseline="",
            fla_mom=False):
    sizes = [] if mom_only else timing_sizes(smoke)
    dtype = torch.float32 if smoke else torch.bfloat16
    results, notes = [], []

    def run(label, size, fn_factory, fwd_only=False):
        if elapsed() > budget_s:
            notes.append(f"{label} {size}: skipped (time budget of {budget_s:.0f}s reached)")
            return
        try:
            fwd, fwdbwd = fn_factory()
            t_f, s_f = bench(fwd, dev)
            t_fb = s_fb = None
            if not fwd_only and fwdbwd is not None:
                try:
                    t_fb, s_fb = bench(fwdbwd, dev)
                except Exception as exc:  # e.g. fla refusing its backward on this Triton
                    notes.append(f"{label} {size}: backward failed: {type(exc).__name__}: "
                                 f"{str(exc)[:200]}")
            results.append(dict(impl=label, size=size, fwd_ms=t_f, fwdbwd_ms=t_fb,
                                fwd_sync_ms=s_f, fwdbwd_sync_ms=s_fb))
            print(f"[{elapsed():6.1f}s] {label:34s} {size}: fwd {t_f:8.3f} ms"
                  + (f", fwd+bwd {t_fb:8.3f} ms" if t_fb is not None else "")
                  + f" (synced: {s_f:.3f}" + (f", {s_fb:.3f})" if s_fb else ")"), flush=True)
        except Exception as exc:
            notes.append(f"{label} {size}: failed: {type(exc).__name__}: {str(exc)[:200]}")
            traceback.print_exc()
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    for size in sizes:
        B, T, H, D = size
        x = make_inputs(B, T, H, D, D, dev, dtype, h0=False)
        do = torch.randn(B, T, H, D, device=dev, dtype=dtype)

        ours = lambda **a: chunk_gated_delta_rule(**a, backend="triton")[0]
        run("ours gdr (triton)", size, lambda: timed_pair(ours, x, do))
        if ours_only:
            continue
        if fla_chunk_gdr is not None and dev.type == "cuda":
            run("fla gdr (chunk)", size, lambda: timed_pair(lambda **a: fla_gdr(**a)[0], x, do))

        def sdpa_factory(B=B, T=T, H=H, D=D):
            q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            g_o = torch.randn(B, H, T, D, device=dev, dtype=dtype)

            def fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=True)

            def fwdbwd():
                q.grad = k.grad = v.grad = None
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g_o)
            return fwd, fwdbwd
        run("torch sdpa (causal)", size, sdpa_factory)
    if ours_only and not mom_only:
        return results, notes
    # MoM layers, ours vs fla (before the second pass: the budget runs out last there).
    B, T, hidden, heads, hd = mom_shape(smoke)
    xm = torch.randn(B, T, hidden, device=dev, dtype=dtype)

    def mom_factory(layer, call):
        leaves = xm.detach().clone().requires_grad_()

        def fwd():
            with torch.no_grad():
                call(layer, xm)

        def fwdbwd():
            leaves.grad = None
            call(layer, leaves).float().sum().backward()
        return fwd, fwdbwd
    layer = our_mom(smoke).to(dev, dtype)
    run("ours MoMLayer", (B, T, hidden), lambda: mom_factory(layer, lambda m, x: m(x)[0]))
    if mom_baseline:
        old = load_mom_baseline(mom_baseline, smoke).to(dev, dtype)
        old.load_state_dict(layer.state_dict())
        with torch.no_grad():
            notes.append(f"MoM baseline {mom_baseline}: output differs from ours by "
                         f"{rel(old(xm)[0], layer(xm)[0]):.1e} (relative, bf16, same weights)")
        run("ours MoMLayer, baseline " + os.path.basename(mom_baseline), (B, T, hidden),
            lambda: mom_factory(old, lambda m, x: m(x)[0]))
    if fla_mom and FlaMomAttention is not None and dev.type == "cuda":
        run("fla MomAttention", (B, T, hidden), lambda: mom_factory(
            FlaMomAttention(hidden_size=hidden, head_dim=hd, num_heads=heads, expand_v=1,
                            num_memories=4, topk=2, shared_mem=True).to(dev, dtype),
            lambda m, x: m(x)[0]))
    # Second pass: our other paths.
    for size in sizes:
        B, T, H, D = size
        x = make_inputs(B, T, H, D, D, dev, dtype, h0=False)
        do = torch.randn(B, T, H, D, device=dev, dtype=dtype)
        ours_la = lambda **a: chunk_linear_attn(a["q"], a["k"], a["v"], a["g"],
                                                initial_state=a["initial_state"],
                                                backend="triton")[0]
        run("ours gla (triton)", size, lambda: timed_pair(ours_la, x, do))
        if size == sizes[0]:
            torch_gdr = lambda **a: chunk_gated_delta_rule(**a, backend="torch")[0]
            run("ours gdr (torch chunk)", size, lambda: timed_pair(torch_gdr, x, do))
            xs = {k: (t[:1, :256] if t is not None else None) for k, t in x.items()}
            naive = lambda **a: naive_gated_delta_rule(**a)[0]
            run("ours gdr (naive loop)", (1, 256, H, D),
                lambda: timed_pair(naive, xs, do[:1, :256]), fwd_only=True)
            if any(r["impl"] == "ours gdr (naive loop)" for r in results):
                notes.append("naive token loop: timed at B=1, T=256 forward only (it takes ~T "
                             "sequential steps; larger sizes skipped as too slow)")
            if any(r["impl"] == "ours gdr (torch chunk)" for r in results):
                notes.append("torch chunk path: first size only (fp32 math, CPU fast path)")
    return results, notes


def mom_shape(smoke: bool):
    """(B, T, hidden, heads, head dim) of the MoM layer timings: 4 memories, top-2, shared."""
    return (2, 64, 32, 2, 16) if smoke else (8, 2048, 1024, 8, 128)


def our_mom(smoke: bool, cls=MoMLayer) -> MoMLayer:
    _, _, hidden, heads, hd = mom_shape(smoke)
    return cls(hidden, num_heads=heads, head_dim=hd, num_memories=4, topk=2,
               shared_memory=True, backend="triton")


def load_mom_baseline(path: str, smoke: bool) -> MoMLayer:
    """Our MoM layer as an earlier version of cl_toolkit/layers/mom.py defines it (a file
    written by ``git show COMMIT:cl_toolkit/layers/mom.py``), so before/after is timed on one
    machine. Loaded as a module of the layers package, so its relative imports use today's
    kernels."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("cl_toolkit.layers._mom_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return our_mom(smoke, module.MoMLayer)


def profile(dev, smoke=False) -> str:
    """Per-kernel CUDA time (torch.profiler) of our gdr forward and forward+backward, bf16,
    and of the MoM layer (whose time is mostly outside the memory kernels): says which stage
    to work on next."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    out = []
    acts = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
    dtype = torch.float32 if smoke else torch.bfloat16

    def table(title, fn, rows):
        fn()
        sync(dev)
        with torch_profile(activities=acts) as prof:
            for _ in range(5):
                fn()
            sync(dev)
        text = prof.key_averages().table(sort_by=f"{dev.type}_time_total", row_limit=rows)
        out.append(f"### {title} (5 calls)\n{text}\n")
        print(out[-1], flush=True)

    sizes = [(2, 64, 2, 16)] if smoke else [(8, 2048, 16, 128), (1, 16384, 16, 128)]
    for B, T, H, D in sizes:
        x = make_inputs(B, T, H, D, D, dev, dtype, h0=False)
        do = torch.randn(B, T, H, D, device=dev, dtype=dtype)
        fwd, fwdbwd = timed_pair(lambda **a: chunk_gated_delta_rule(**a, backend="triton")[0],
                                 x, do)
        table(f"ours gdr fwd {(B, T, H, D)}", fwd, 12)
        table(f"ours gdr fwd+bwd {(B, T, H, D)}", fwdbwd, 12)
    B, T, hidden, _, _ = mom_shape(smoke)
    layer = our_mom(smoke).to(dev, dtype)
    xm = torch.randn(B, T, hidden, device=dev, dtype=dtype, requires_grad=True)

    def mom_fwd():
        with torch.no_grad():
            layer(xm)

    def mom_fwdbwd():
        xm.grad = None
        layer(xm)[0].float().sum().backward()
    table(f"ours MoMLayer fwd (B, T, hidden) = {(B, T, hidden)}", mom_fwd, 30)
    table(f"ours MoMLayer fwd+bwd (B, T, hidden) = {(B, T, hidden)}", mom_fwdbwd, 30)
    return "\n".join(out)


def render(meta, rows, results, notes, ceiling, fla_ref=None):
    out = ["# cl_toolkit.kernels GPU benchmark", "",
           f"- device: {meta['device']}", f"- torch {meta['torch']}, triton {meta['triton']}, "
           f"fla: {meta['fla']}", f"- wall: {elapsed():.0f}s", ""]
    out += ["## Correctness (relative error ||x - ref|| / ||ref||)", "",
            "| check | dtype | tensor | ours | fla | ok |", "|---|---|---|---|---|---|"]
    for r in rows:
        fe = r["fla_err"]
        fe = f"{fe:.2e}" if isinstance(fe, float) else (fe or "-")
        out.append(f"| {r['check']} | {r['dtype']} | {r['tensor']} | {r['err']:.2e} | {fe} | "
                   f"{'yes' if r['ok'] else 'NO'} |")
    if results:
        bad = "" if all(r["ok"] for r in rows) else " - NOT VALID: a correctness check failed"
        out += ["", f"## Timings (median ms, bf16, CUDA events){bad}", "",
                "| impl | (B, T, H, D) | fwd ms | fwd+bwd ms | fwd vs fla | fwd+bwd vs fla |"
                " min-IO fwd GB/s (% copy) | synced fwd / fwd+bwd ms |",
                "|---|---|---|---|---|---|---|---|"]
        fla = {r["size"]: r for r in results if r["impl"].startswith("fla gdr")}
        fla.update(fla_ref or {})
        for r in results:
            ref = fla.get(r["size"])
            sp_f = sp_b = "-"
            if ref and r["impl"] != ref["impl"] and r["impl"].startswith("ours gdr"):
                sp_f = f"{ref['fwd_ms'] / r['fwd_ms']:.2f}x"
                if r["fwdbwd_ms"] and ref["fwdbwd_ms"]:
                    sp_b = f"{ref['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}x"
            bw = "-"
            if r["impl"].startswith(("ours gdr (triton)", "fla gdr", "ours gla")) and \
                    len(r["size"]) == 4:
                B, T, H, D = r["size"]
                nbytes = B * T * H * D * 2 * 4 + B * T * H * 4 * 2  # q,k,v,o bf16 + g,beta fp32
                gbs = nbytes / (r["fwd_ms"] * 1e-3) / 1e9
                bw = f"{gbs:.0f} ({100 * gbs / ceiling:.0f}%)"
            fb = f"{r['fwdbwd_ms']:.3f}" if r["fwdbwd_ms"] else "-"
            sfb = f"{r['fwdbwd_sync_ms']:.3f}" if r["fwdbwd_sync_ms"] else "-"
            out.append(f"| {r['impl']} | {r['size']} | {r['fwd_ms']:.3f} | {fb} | {sp_f} | "
                       f"{sp_b} | {bw} | {r['fwd_sync_ms']:.3f} / {sfb} |")
        out += ["", f"Copy ceiling (device-to-device copy, read+write): {ceiling:.0f} GB/s. "
                "min-IO bandwidth counts only q, k, v, o, g, beta once; the chunk kernels also "
                "move per-chunk states, so it is a lower bound on their traffic.", ""]
        out += ["Speedup columns: fla time / our time at the same size (>1: ours faster). "
                "fwd / fwd+bwd: calls queued back to back (CUDA events per call, one sync at "
                "the end), i.e. GPU time as in a training loop; synced: a sync after every "
                "call, so host launch work is included."]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def autotune_choices() -> dict:
    """The config each autotuned kernel picked, per autotune key, after the runs above, so a
    later session can see which warps / stages won (and prune the losers)."""
    from triton.runtime.autotuner import Autotuner
    from cl_toolkit.kernels.common import chunk_triton as ct

    out = {}
    for name in dir(ct):
        kernel = getattr(ct, name)
        if isinstance(kernel, Autotuner) and kernel.cache:
            out[name] = {str(key): str(cfg) for key, cfg in kernel.cache.items()}
    return out


def cubin_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of a cubin, read with the cuobjdump that
    ships with Triton. Stack above 0 means ptxas spilled registers to local memory."""
    import re
    import subprocess
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(m.group(1)), int(m.group(2))


def compile_check(head_dim: int, dtype: str, arch: int = 90, only: str = "") -> int:
    """Compile every kernel, at every config its autotuner may pick, for a CUDA arch without a
    GPU, and print shared memory, registers and spill (stack) bytes per thread.

    Catches compile errors and shared-memory overruns (an H100 gives 227 KB per block) on a
    machine with no GPU, and shows register pressure: a config that spills hundreds of bytes
    per thread is slow before it is timed. Kernels are built with ``triton.compile`` for
    ``arch`` and read back with cuobjdump.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    import triton
    from cl_toolkit.kernels.common import chunk_triton as ct, recurrent_triton as rt
    from cl_toolkit.kernels.short_conv import conv as sc

    def jit_fn(k):
        while not isinstance(k, JITFunction):
            k = k.fn
        return k
    fp32_ptrs = {"gcum", "ht", "dh0", "dg", "dbeta", "dht", "tmat", "g", "beta", "A_log",
                 "dt_bias", "dk_part", "dg_part", "de_local", "dw_part", "dcache"}
    ints = {"cu_seqlens": "*i32", "chunk_indices": "*i32", "chunk_offsets": "*i32", "H": "i32",
            "scale": "fp32", "C": "i32", "stride_x": "i32"}
    prec = "tf32x3" if dtype == "fp32" else "tf32"
    D = head_dim
    bk = max(16, triton.next_power_of_2(D))
    bv = min(64, bk)
    bv_scan = 32  # what _bv_scan picks at (1, 16384) and (4, 4096); 64 at (8, 2048)
    # L2 / GATE on: the fused variants contain every code path of the plain ones.
    base = dict(K=D, V=D, BT=64, BK=bk, BV=bv, USE_G=True, L2=True, PREC=prec)
    jobs = []
    for delta in (True, False):
        jobs += [(ct._prep_kernel, dict(base, DELTA=delta, STORE_T=True, LOAD_T=False,
                                        GATE=True)),
                 (ct._fwd_h_kernel, dict(base, DELTA=delta, USE_H0=True, BV=bv_scan)),
                 (ct._fwd_h_kernel, dict(base, DELTA=delta, USE_H0=True)),
                 (ct._bwd_dh_kernel, dict(base, DELTA=delta, USE_DHT=True, BV=bv_scan,
                                          DV_LOCAL=True)),
                 (ct._bwd_qk_kernel, dict(base, DELTA=delta))]
    jobs += [(ct._prep_kernel, dict(base, DELTA=True, STORE_T=False, LOAD_T=True, GATE=True)),
             (ct._bwd_wy_kernel, dict(base)), (ct._bwd_dv_local_kernel, dict(base))]
    jobs += [(ct._fwd_o_kernel, dict(base)),
             (rt._recurrent_kernel, dict(K=D, V=D, BK=bk, BV=32, USE_G=True, USE_H0=True,
                                         DELTA=True))]
    conv = dict(W=4, BT=sc._BT, BC=sc._BC, USE_CACHE=True, num_warps=sc._WARPS)
    jobs += [(sc._segment_conv_fwd_kernel, conv),
             (sc._segment_conv_dpre_kernel, dict(conv, CACHE_GRAD=True)),
             (sc._segment_conv_dx_kernel, dict(W=4, BT=sc._BT, BC=sc._BC,
                                               num_warps=sc._WARPS))]
    failed = 0
    print(f"| kernel ({dtype}, K = V = {D}, BT 64) | DELTA | BV | warps | stages | shared (KB) "
          "| registers | spill stack (B/thread) |")
    print("|---|---|---|---|---|---|---|---|")
    for kernel, consts in jobs:
        consts = dict(consts)
        warps_fixed = consts.pop("num_warps", 4)  # a kernel launched without the autotuner
        fn = jit_fn(kernel)
        if only and fn.__name__ not in only.split(","):
            continue
        sig = {n: "constexpr" if n in consts else ints.get(
            n, "*fp32" if n in fp32_ptrs else "*" + dtype) for n in fn.arg_names}
        configs = ([(c.num_warps, c.num_stages) for c in kernel.configs]
                   if isinstance(kernel, Autotuner) else [(warps_fixed, 2)])
        for warps, stages in configs:
            row = (f"| {fn.__name__} | {consts.get('DELTA', '-')} | {consts.get('BV', '-')} | "
                   f"{warps} | {stages} |")
            try:
                c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                   target=GPUTarget("cuda", arch, 32),
                                   options=dict(num_warps=warps, num_stages=stages))
                regs, stack = cubin_usage(c.asm["cubin"])
                print(f"{row} {c.metadata.shared / 1024:.0f} | {regs} | {stack} |", flush=True)
            except Exception as exc:
                failed += 1
                print(f"{row} FAILED {type(exc).__name__}: {str(exc)[:300]} | | |", flush=True)
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="kernel checks in bf16 only, plus the MoM layer check (short leases)")
    ap.add_argument("--no-fla-check", action="store_true",
                    help="leave fla out of the correctness table (saves its compile time)")
    ap.add_argument("--profile", action="store_true",
                    help="per-kernel CUDA times of our gdr and MoM layer, forward and "
                         "forward+backward")
    ap.add_argument("--skip-correctness", action="store_true",
                    help="timings only (when the checks already passed on this commit)")
    ap.add_argument("--time-on-fail", action="store_true",
                    help="take the timings even when a check fails (marked NOT VALID)")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BUDGET_S", 330)))
    ap.add_argument("--compile-check", metavar="DTYPE", choices=("bf16", "fp16", "fp32"),
                    help="no GPU needed: compile the kernels for sm_90 and print shared memory")
    ap.add_argument("--head-dim", type=int, default=128, help="with --compile-check")
    ap.add_argument("--only", default="", help="with --compile-check: kernel names, comma list")
    ap.add_argument("--ours-only", action="store_true",
                    help="time only our gdr kernels (with --fla-ref for the speedups)")
    ap.add_argument("--fla-ref", default="",
                    help="gpu_kernels.json of an earlier run on this machine: its fla rows "
                         "give the speedup columns when fla is not timed here")
    ap.add_argument("--mom-only", action="store_true",
                    help="time only the MoM layers (ours, the baseline, fla's with --fla-mom)")
    ap.add_argument("--fla-mom", action="store_true",
                    help="also time fla's MomAttention: its varlen backward compiles and tunes "
                    "for minutes, so gpu_kernels.sh runs it last, on its own, under a timeout")
    ap.add_argument("--mom-baseline", default=os.environ.get("MOM_BASELINE", ""),
                    metavar="FILE", help="also time the MoMLayer of this earlier "
                    "cl_toolkit/layers/mom.py (git show COMMIT:cl_toolkit/layers/mom.py > FILE)")
    ap.add_argument("--warm", metavar="PARTS", default="",
                    help="only build and tune the kernels of these parts (comma list of "
                    f"{', '.join(WARM_PARTS)}); gpu_kernels.sh runs them in parallel first")
    ap.add_argument("--keep-fla-guard", action="store_true",
                    help="leave fla's #640 guard on (no fla backward on Triton < 3.7.1, Hopper)")
    args = ap.parse_args()
    if args.compile_check:
        return compile_check(args.head_dim, args.compile_check, only=args.only)
    dev = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device; use --smoke to check the script on CPU")
        return 2
    import triton
    meta = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)",
                torch=torch.__version__, triton=triton.__version__,
                fla=("0.6.0 importable" if FLA_ERR is None else f"not available ({FLA_ERR})"))
    if fla_chunk_gdr is not None and dev.type == "cuda" and not args.keep_fla_guard \
            and bypass_fla_640():
        meta["fla"] += " (#640 guard off: its backward is timed, its gradients checked)"
    print(meta, flush=True)
    if args.warm:
        for part in args.warm.split(","):
            if part not in WARM_PARTS:
                raise SystemExit(f"--warm: unknown part {part!r}; choose from {WARM_PARTS}")
            if part.startswith("fla") and (FLA_ERR or FLA_MOM_ERR or dev.type != "cuda"):
                print(f"warm {part}: skipped (fla not importable here)")
                continue
            warm(part, dev, args.smoke)
        return 0
    rows = [] if args.skip_correctness else correctness(dev, args.smoke, args.quick,
                                                         not args.no_fla_check)
    failed = [r for r in rows if not r["ok"]]
    results, notes, ceiling = [], [], 0.0
    if not failed or args.time_on_fail:
        ceiling = copy_ceiling(dev)
        results, notes = timings(dev, args.smoke, args.budget_s, args.ours_only,
                                 args.mom_only, args.mom_baseline, args.fla_mom)
    if failed:
        notes.insert(0, "CORRECTNESS FAILED: " + ("timings are NOT VALID results. "
                     if results else "no timings taken. ") + "Failing: "
                     + "; ".join(f"{r['check']} {r['dtype']} {r['tensor']} {r['err']:.2e}"
                                 for r in failed))
    os.makedirs(args.out, exist_ok=True)
    if args.profile and not failed:
        with open(os.path.join(args.out, "gpu_profile.txt"), "w") as f:
            f.write(profile(dev, args.smoke))
    if FLA_ERR:
        notes.append(f"fla kernels not timed: {FLA_ERR}")
    if FLA_MOM_ERR:
        notes.append(f"fla MomAttention not timed: {FLA_MOM_ERR}")
    tuned = autotune_choices()
    fla_ref = None
    if args.fla_ref and os.path.exists(args.fla_ref):
        with open(args.fla_ref) as f:
            fla_ref = {tuple(r["size"]): r for r in json.load(f)["timings"]
                       if r["impl"].startswith("fla gdr")}
    text = render(meta, rows, results, notes, ceiling, fla_ref)
    if tuned:
        text += "\nAutotuner choices (kernel, key -> config):\n\n" + "\n".join(
            f"- {name} {key}: {cfg}" for name, choices in tuned.items()
            for key, cfg in choices.items()) + "\n"
    print(text, flush=True)
    stem = "gpu_kernels" + ("_mom" if args.mom_only else "")
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(dict(meta=meta, correctness=rows, timings=results, notes=notes,
                       copy_gbs=ceiling, autotune=tuned), f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
