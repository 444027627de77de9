"""A LoRA-adapted gated MLP (``down(act(gate(x)) · up(x))``) as one autograd function.

peft wraps each of the MLP's three projections on its own: the base matmul, the adapter's two
small matmuls, its scale and its add, each an autograd node that saves its input. Over a whole
MLP that is ~20 nodes, and the saved tensors include ``act(gate)`` and the product ``h`` (two
``[tokens, intermediate]`` activations per layer) that the backward pass can recompute from
``gate`` and ``up`` in a few elementwise passes. This function computes the same forward with
each adapter's scale folded into the add (``addmm``), saves only the MLP input, ``gate``, ``up``
and the adapters' rank-``r`` intermediates, and writes the backward out by hand.

It replaces the MLP's ``forward`` for the duration of training (``fused_mlps``), and only where it
is known to compute what the module computes: every projection a peft LoRA layer with one plain
adapter (no DoRA or other variant, not merged, adapters enabled, no forward hook on the layer or
its parts), frozen bias-free base weights, a SiLU or ReLU activation, and the module's own
forward equal to ``down(act(gate(x)) · up(x))`` on a probe input (measured at install, as
``packing_check`` measures packing, so an MLP whose forward differs keeps it). Anything else at
call time (a disabled adapter for a DPO reference pass, a merged one, extra arguments) takes the
module's own forward.

Measured on SmolLM2-135M LoRA (bench/README.md, "Session 24").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation

ACTIVATIONS = {nn.SiLU: "silu", SiLUActivation: "silu", nn.ReLU: "relu"}
#: The probe's largest accepted difference from the module's own forward (fp32; rounding ~1e-7).
PROBE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class LoraParts:
    """One adapted projection: frozen ``weight``, adapter ``a``/``b``, ``scale`` and dropout ``p``."""

    weight: torch.Tensor
    a: nn.Parameter
    b: nn.Parameter
    scale: float
    dropout: float


def lora_parts(layer: nn.Module) -> LoraParts | None:
    """``layer``'s pieces when it is a peft LoRA linear layer this function can compute; else None."""
    base = getattr(layer, "base_layer", None)
    if type(base) is not nn.Linear or base.bias is not None or base.weight.requires_grad:
        return None
    if getattr(layer, "disable_adapters", True) or getattr(layer, "merged", True) or getattr(layer, "lora_variant", None):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in (layer, base, a, b)):
        return None  # a hook (pruning masks, importance scores, captured activations) must see its call
    if not (a.weight.requires_grad and b.weight.requires_grad):
        return None
    if isinstance(dropout, nn.Dropout):
        p = dropout.p if layer.training else 0.0
    elif isinstance(dropout, nn.Identity):
        p = 0.0
    else:
        return None
    return LoraParts(base.weight, a.weight, b.weight, float(layer.scaling[name]), p)


def _activation(kind: str, gate: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) if kind == "silu" else F.relu(gate)


def _activation_slope(kind: str, gate: torch.Tensor) -> torch.Tensor:
    if kind == "relu":
        return (gate > 0).to(gate.dtype)
    sig = torch.sigmoid(gate)
    return sig * (1 + gate * (1 - sig))


def _dropped(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` with LoRA dropout applied, and the kept-mask (None without dropout)."""
    if p == 0.0:
        return x, None
    keep = torch.rand(x.shape, device=x.device) >= p
    return x * keep / (1 - p), keep


class _FusedLoraMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, ag, bg, wu, au, bu, wd, ad, bd, settings):  # type: ignore[override]
        inputs = (x, wg, ag, bg, wu, au, bu, wd, ad, bd)
        kind, dtype, (sg, su, sd), (pg, pu, pd) = settings
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        wg, ag, bg, wu, au, bu, wd, ad, bd = (t.to(dtype) for t in (wg, ag, bg, wu, au, bu, wd, ad, bd))
        xg, keep_g = _dropped(x2, pg)
        xu, keep_u = _dropped(x2, pu)
        low_g, low_u = xg @ ag.t(), xu @ au.t()  # [tokens, r]
        gate = torch.addmm(x2 @ wg.t(), low_g, bg.t(), alpha=sg)
        up = torch.addmm(x2 @ wu.t(), low_u, bu.t(), alpha=su)
        h = _activation(kind, gate) * up
        hd, keep_d = _dropped(h, pd)
        low_d = hd @ ad.t()
        out = torch.addmm(h @ wd.t(), low_d, bd.t(), alpha=sd)
        ctx.settings = settings
        ctx.dtypes = [t.dtype for t in inputs]
        ctx.masks = (keep_g, keep_u, keep_d)
        ctx.save_for_backward(x2, gate, up, low_g, low_u, low_d, wg, ag, bg, wu, au, bu, wd, ad, bd)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        kind, dtype, (sg, su, sd), (pg, pu, pd) = ctx.settings
        keep_g, keep_u, keep_d = ctx.masks
        x2, gate, up, low_g, low_u, low_d, wg, ag, bg, wu, au, bu, wd, ad, bd = ctx.saved_tensors
        d_out = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        act = _activation(kind, gate)
        h = act * up
        hd = h if keep_d is None else h * keep_d / (1 - pd)
        # down_proj and its adapter
        d_bd = (d_out.t() @ low_d) * sd
        d_low_d = (d_out @ bd) * sd
        d_ad = d_low_d.t() @ hd
        d_hd = d_low_d @ ad
        d_h = d_out @ wd
        d_h += d_hd if keep_d is None else d_hd * keep_d / (1 - pd)
        # the gate's activation and the product with up; the slope in fp32 and rounded once, as
        # autograd's own silu backward does (computed in bf16 it rounds four times)
        d_up = d_h * act
        d_gate = (d_h.float() * up.float() * _activation_slope(kind, gate.float())).to(dtype)
        # gate_proj's and up_proj's adapters, and the input
        d_bg, d_bu = (d_gate.t() @ low_g) * sg, (d_up.t() @ low_u) * su
        d_low_g, d_low_u = (d_gate @ bg) * sg, (d_up @ bu) * su
        xg = x2 if keep_g is None else x2 * keep_g / (1 - pg)
        xu = x2 if keep_u is None else x2 * keep_u / (1 - pu)
        d_ag, d_au = d_low_g.t() @ xg, d_low_u.t() @ xu
        d_x = torch.addmm(d_gate @ wg, d_up, wu)
        d_x += d_low_g @ ag if keep_g is None else (d_low_g @ ag) * keep_g / (1 - pg)
        d_x += d_low_u @ au if keep_u is None else (d_low_u @ au) * keep_u / (1 - pu)
        grads = (d_x.view(*grad_out.shape[:-1], x2.shape[-1]), None, d_ag, d_bg, None, d_au, d_bu, None, d_ad, d_bd)
        return (*(g.to(t) if g is not None and needed else None for g, t, needed in zip(grads, ctx.dtypes, ctx.needs_input_grad)), None)


def fused_forward(mlp: nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """``mlp``'s forward through ``_FusedLoraMLP`` when its projections allow it right now."""
    parts = [lora_parts(mlp.gate_proj), lora_parts(mlp.up_proj), lora_parts(mlp.down_proj)]
    if args or kwargs or any(p is None for p in parts):
        return type(mlp).forward(mlp, x, *args, **kwargs)
    gate, up, down = parts
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    settings = (ACTIVATIONS[type(mlp.act_fn)], dtype, (gate.scale, up.scale, down.scale), (gate.dropout, up.dropout, down.dropout))
    with torch.autocast(device, enabled=False):  # the function casts to ``dtype`` itself
        return _FusedLoraMLP.apply(x, gate.weight, gate.a, gate.b, up.weight, up.a, up.b, down.weight, down.a, down.b, settings)


def _computes_the_same(mlp: nn.Module) -> bool:
    """Whether ``fused_forward`` equals the module's own forward on a probe input (no grad, no
    dropout). Weights held in bf16/fp16 are compared under autocast, with that dtype's rounding
    as the tolerance: what the probe looks for (a bias, a dropout, another formula) is far larger."""
    weight = mlp.gate_proj.base_layer.weight
    low = weight.dtype not in (torch.float32, torch.float64)
    probe = torch.randn(2, 3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    was_training = mlp.training
    mlp.eval()
    try:
        with torch.no_grad(), torch.autocast(weight.device.type, dtype=weight.dtype if low else None, enabled=low):
            own = type(mlp).forward(mlp, probe).float()
            fused = fused_forward(mlp, probe).float()
    finally:
        mlp.train(was_training)
    tolerance = 3e-2 if low else PROBE_TOLERANCE
    return bool((own - fused).abs().max() <= tolerance * max(1.0, float(own.abs().max())))


def candidates(model: nn.Module) -> list[nn.Module]:
    """The gated MLPs of ``model`` whose projections are LoRA layers this function computes."""
    found = []
    for module in model.modules():
        projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if type(getattr(module, "act_fn", None)) in ACTIVATIONS and all(p is not None and lora_parts(p) for p in projections):
            found.append(module)
    return found


@contextlib.contextmanager
def fused_mlps(model: nn.Module) -> Iterator[int]:
    """Run ``model``'s eligible gated MLPs through the fused function while the context lasts;
    yields how many. One probe per distinct MLP class decides whether its forward is the gated
    form this function computes."""
    verdicts: dict[type, bool] = {}
    patched = []
    for mlp in candidates(model):
        if type(mlp) not in verdicts:
            verdicts[type(mlp)] = _computes_the_same(mlp)
        if verdicts[type(mlp)]:
            mlp.forward = fused_forward.__get__(mlp)
            patched.append(mlp)
    try:
        yield len(patched)
    finally:
        for mlp in patched:
            del mlp.forward
