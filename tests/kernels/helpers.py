"""Shared input builders and the fwd+grad comparison used by the op tests."""
from typing import Dict, List, Optional

import torch

from .conftest import rel_err

TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def make_inputs(B, T, H, K, V, dtype, *, gate=True, beta=True, n_states=None, h0=True):
    """Random inputs with unit-norm keys (as the layer feeds them) and moderate decays."""
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    x = dict(q=torch.randn(B, T, H, K), k=k, v=torch.randn(B, T, H, V),
             g=-torch.rand(B, T, H) * 0.3 if gate else None,
             beta=torch.rand(B, T, H) if beta else None,
             initial_state=torch.randn(n_states or B, H, V, K) if h0 else None)
    out = {}
    for name, t in x.items():
        if t is None:
            out[name] = None
        elif name in ("g", "initial_state"):
            out[name] = t.float() if dtype != torch.float64 else t.double()
        else:
            out[name] = t.to(dtype)
    return out


def run_with_grads(fn, inputs: Dict[str, Optional[torch.Tensor]], do, dht, **kw):
    """Calls fn, backprops o*do + final*dht, returns (o, final, {name: grad})."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    args = {n: leaves.get(n) for n in inputs}
    h0 = args.pop("initial_state")
    o, final = fn(**args, initial_state=h0, output_final_state=True, **kw)
    loss = (o.double() * do.double()).sum() + (final.double() * dht.double()).sum()
    loss.backward()
    return o, final, {n: t.grad for n, t in leaves.items()}


def compare(fn, ref, inputs, tol, **kw) -> List[str]:
    """Runs fn on inputs and ref on float64 copies; returns a list of failures."""
    B, T, H, _ = inputs["q"].shape
    V = inputs["v"].shape[-1]
    n = inputs["initial_state"].shape[0] if inputs["initial_state"] is not None else (
        B if kw.get("cu_seqlens") is None else kw["cu_seqlens"].numel() - 1)
    K = inputs["q"].shape[-1]
    do = torch.randn(B, T, H, V)
    dht = torch.randn(n, H, V, K)
    o, f, grads = run_with_grads(fn, inputs, do, dht, **kw)
    ref_kw = {k: v for k, v in kw.items() if k in ("cu_seqlens", "scale")}
    ref_inputs = {n_: (t.double() if t is not None else None) for n_, t in inputs.items()}
    o2, f2, grads2 = run_with_grads(ref, ref_inputs, do, dht, **ref_kw)
    errs = {"o": rel_err(o, o2), "final": rel_err(f, f2)}
    errs.update({"d" + n_: rel_err(grads[n_], grads2[n_]) for n_ in grads2})
    return [f"{name}: rel err {e:.2e} > {tol:.0e}" for name, e in errs.items() if e > tol]
