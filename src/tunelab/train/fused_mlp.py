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
call time (a disabled adapter for a DPO reference pass, a merged one, peft's own ``nn.Dropout``
in training, extra arguments) takes the module's own forward. LoRA dropout through
``bit_dropout`` is computed here: the masks drawn as the unfused adapters draw them (gate's,
up's, down's), so a fused and an unfused run see the same random stream (pipeline stages compare
against one process), and kept as booleans.

Measured on SmolLM2-135M LoRA (bench/README.md, "Session 24").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation

from tunelab.methods.peft_adapters import lora_parts
from tunelab.train.bit_dropout import add_masked_product, draw_keep, dropped_scales, fused_rate, masked
from tunelab.train.block_kernels import silu_mul, silu_mul_backward
from tunelab.train.stacked_projections import ProjectionStack

ACTIVATIONS = {nn.SiLU: "silu", SiLUActivation: "silu", nn.ReLU: "relu"}
#: The probe's largest accepted difference from the module's own forward (fp32; rounding ~1e-7).
PROBE_TOLERANCE = 1e-5


def _activation(kind: str, gate: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) if kind == "silu" else F.relu(gate)


def _activation_backward(kind: str, grad: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``grad · act'(gate)`` by the kernel autograd's own backward of ``act`` uses: one pass that
    computes the slope in fp32 per element and rounds once. Written as sigmoid, products and casts
    it took ten passes over ``[tokens, intermediate]``: 0.60 ms against 0.37 ms (with the product
    ``grad`` comes from) per SmolLM2 layer of 384 tokens (bench/README.md, "Session 25")."""
    if kind == "relu":
        return torch.ops.aten.threshold_backward(grad, gate, 0)
    return torch.ops.aten.silu_backward(grad, gate)


def adapter_up_grad(d_out: torch.Tensor, low: torch.Tensor, scale: float) -> torch.Tensor:
    """The gradient of an adapter's up-projection ``B`` (``[out, r]``): ``scale · d_outᵀ low``, computed
    as ``(lowᵀ d_out)ᵀ``. The same products, but oneDNN's bf16 kernels run a ``[r, tokens] @ [tokens, out]``
    product 1.3-1.8x faster than ``[out, tokens] @ [tokens, r]`` (SmolLM2 shapes at 448 tokens, 2 threads:
    55 vs 97 µs for out = 576, 109 vs 176 µs for 1,536). The transposed view is what autograd
    accumulates; it copies it to the parameter's layout once (``[out, 16]``: a few thousand values)."""
    return (low.t() @ d_out).t() * scale


def mlp_forward(x: torch.Tensor, weights: tuple[torch.Tensor, ...], settings: tuple) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """The MLP's ``[tokens, hidden]`` output for the flattened ``x`` and what ``mlp_backward`` needs;
    ``weights`` are ``(W, A, B)`` of gate, up and down, ``settings`` ``(activation, dtype, scales,
    dropout rate)``. With dropout each adapter draws its mask (``bit_dropout.draw_keep``) when the
    unfused MLP's would: gate's, up's, then down's on the product."""
    kind, dtype, scales, rate = settings
    sg, su, sd = dropped_scales(scales, rate)
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    wg, ag, bg, wu, au, bu, wd, ad, bd = (t.to(dtype) for t in weights)
    keep_g, keep_u = draw_keep(x2, rate), draw_keep(x2, rate)
    low_g, low_u = masked(x2, keep_g) @ ag.t(), masked(x2, keep_u) @ au.t()  # [tokens, r]
    # in place: an out-of-place addmm first copies its [tokens, intermediate] summand
    gate = (x2 @ wg.t()).addmm_(low_g, bg.t(), alpha=sg)
    up = (x2 @ wu.t()).addmm_(low_u, bu.t(), alpha=su)
    h = silu_mul(gate, up) if kind == "silu" else _activation(kind, gate) * up
    keep_d = draw_keep(h, rate)
    low_d = masked(h, keep_d) @ ad.t()
    out = (h @ wd.t()).addmm_(low_d, bd.t(), alpha=sd)
    return out, (x2, gate, up, low_g, low_u, low_d, wg, ag, bg, wu, au, bu, wd, ad, bd, keep_g, keep_u, keep_d)


def mlp_backward(saved: tuple[torch.Tensor | None, ...], settings: tuple, grad_out: torch.Tensor, input_grad: bool) -> tuple[torch.Tensor | None, ...]:
    """``(d_x, d_ag, d_bg, d_au, d_bu, d_ad, d_bd)`` in the compute dtype from the output's gradient;
    ``d_x`` (``[tokens, hidden]``) None unless ``input_grad``."""
    kind, dtype, scales, rate = settings
    sg, su, sd = dropped_scales(scales, rate)
    x2, gate, up, low_g, low_u, low_d, wg, ag, bg, wu, au, bu, wd, ad, bd, keep_g, keep_u, keep_d = saved
    d_out = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
    # down_proj and its adapter
    d_bd = adapter_up_grad(d_out, low_d, sd)
    d_low_d = (d_out @ bd) * sd
    d_h = add_masked_product(d_out @ wd, d_low_d, ad, keep_d)
    # the gate's activation and the product with up (recomputed), rounded where autograd's own nodes round
    if kind == "silu":
        h, d_gate, d_up = silu_mul_backward(d_h, gate, up)
    else:
        act = _activation(kind, gate)
        h, d_up, d_gate = act * up, d_h * act, _activation_backward(kind, d_h * up, gate)
    d_ad = d_low_d.t() @ masked(h, keep_d)
    # gate_proj's and up_proj's adapters, and the input
    d_bg, d_bu = adapter_up_grad(d_gate, low_g, sg), adapter_up_grad(d_up, low_u, su)
    d_low_g, d_low_u = (d_gate @ bg) * sg, (d_up @ bu) * su
    d_ag, d_au = d_low_g.t() @ masked(x2, keep_g), d_low_u.t() @ masked(x2, keep_u)
    d_x = None
    if input_grad:  # none for an input that needs none (the first block's, with attention frozen)
        d_x = (d_gate @ wg).addmm_(d_up, wu)
        d_x = add_masked_product(add_masked_product(d_x, d_low_g, ag, keep_g), d_low_u, au, keep_u)
    return d_x, d_ag, d_bg, d_au, d_bu, d_ad, d_bd


def stacked_mlp_forward(x: torch.Tensor, stacks: tuple[ProjectionStack, ProjectionStack], kind: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``mlp_forward`` without dropout through ``stacked_projections``: gate and up with their
    adapters as one stack (``gate`` and ``up`` are column blocks of its product), down as another;
    the product ``h`` is recomputed in the backward, as there."""
    gate_up, down = stacks
    (gate, up), (x2, low_gu) = gate_up.forward(x.reshape(-1, x.shape[-1]).to(gate_up.dtype))
    h = silu_mul(gate, up) if kind == "silu" else _activation(kind, gate) * up
    (out,), (_, low_d) = down.forward(h)
    return out, (x2, gate, up, low_gu, low_d)


def stacked_mlp_backward(saved: tuple[torch.Tensor, ...], stacks: tuple[ProjectionStack, ProjectionStack], kind: str,
                         grad_out: torch.Tensor, input_grad: bool) -> tuple[torch.Tensor | None, ...]:
    """``mlp_backward``'s ``(d_x, d_ag, d_bg, d_au, d_bu, d_ad, d_bd)`` for ``stacked_mlp_forward``:
    the activation's gradients written straight into gate/up's stacked gradient matrix."""
    gate_up, down = stacks
    x2, gate, up, low_gu, low_d = saved
    tokens, width = gate.shape
    d_down = down.gradient_buffer(tokens)
    d_down[:, : down.width].copy_(grad_out.reshape(tokens, -1))
    d_h = down.input_gradient(d_down, True)
    d_gu = gate_up.gradient_buffer(tokens)
    d_gate, d_up = d_gu[:, :width], d_gu[:, width : 2 * width]
    if kind == "silu":
        h, _, _ = silu_mul_backward(d_h, gate, up, out=(d_gate, d_up))
    else:
        act = _activation(kind, gate)
        h = act * up
        d_up.copy_(d_h * act)
        d_gate.copy_(_activation_backward(kind, d_h * up, gate))
    down_grads = down.adapter_grads(h, low_d, d_down)
    d_x = gate_up.input_gradient(d_gu, input_grad)
    return (d_x, *gate_up.adapter_grads(x2, low_gu, d_gu), *down_grads)


class _FusedLoraMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, ag, bg, wu, au, bu, wd, ad, bd, settings):  # type: ignore[override]
        inputs = (x, wg, ag, bg, wu, au, bu, wd, ad, bd)
        out, saved = mlp_forward(x, inputs[1:], settings)
        ctx.settings = settings
        ctx.dtypes = [t.dtype for t in inputs]
        ctx.save_for_backward(*saved)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        d_x, d_ag, d_bg, d_au, d_bu, d_ad, d_bd = mlp_backward(ctx.saved_tensors, ctx.settings, grad_out, ctx.needs_input_grad[0])
        if d_x is not None:
            d_x = d_x.view(*grad_out.shape[:-1], d_x.shape[-1])
        grads = (d_x, None, d_ag, d_bg, None, d_au, d_bu, None, d_ad, d_bd)
        return (*(g.to(t) if g is not None and needed else None for g, t, needed in zip(grads, ctx.dtypes, ctx.needs_input_grad)), None)


def fused_forward(mlp: nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """``mlp``'s forward through ``_FusedLoraMLP`` when its projections allow it right now."""
    parts = [lora_parts(mlp.gate_proj), lora_parts(mlp.up_proj), lora_parts(mlp.down_proj)]
    rate = None if args or kwargs or any(p is None for p in parts) else fused_rate(parts)  # type: ignore[arg-type]
    if rate is None:
        return type(mlp).forward(mlp, x, *args, **kwargs)
    gate, up, down = parts
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    settings = (ACTIVATIONS[type(mlp.act_fn)], dtype, (gate.scale, up.scale, down.scale), rate)
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
