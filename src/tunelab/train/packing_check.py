"""Whether a model computes on a packed row exactly what it computes on each example alone.

Packing (``tunelab.data.collate.collate_packed``) puts examples end to end in one row with
restarting ``position_ids`` and no attention mask; the model must read the restarts as example
boundaries. Whether it does is decided deep inside its forward: transformers builds the
block-diagonal mask only in its shared masking utilities, ``varlen_attention`` only reaches
models that use the attention interface, BLOOM's forward drops ``position_ids`` (its packed
examples attend across boundaries), BERT-style models attend both ways (across the whole row
until transformers 5.25 taught its bidirectional mask to read restarting positions). A structural
check (lists of model types, ``_supports_attention_backend``) would only guess at all that, and
goes stale with each transformers release, as 5.25 showed. So it is measured: a forward of two short sequences packed into
one row, compared with each sequence alone. The probe is three forwards of 16 tokens in all, under
``no_grad``, negligible next to loading the model even at 135M parameters.
"""

from __future__ import annotations

import contextlib

import torch

from tunelab.train.varlen_attention import segment_bounds, varlen_attention

PROBE_LENGTHS = (5, 3)
#: Largest packed-vs-alone logit difference accepted, relative to the largest logit. fp32
#: rounding gives ~1e-7 (Llama); BLOOM's cross-example attention gives ~1e-2.
TOLERANCE = 1e-4


def packs_exactly(model: torch.nn.Module, *, varlen: bool) -> bool:
    """Whether ``model``'s logits on a packed row equal those of each example run alone.

    ``varlen`` probes the per-example attention path (``varlen_attention``) that the causal-LM
    objective uses on packed rows, so the answer is about the forward training will run. Every
    module's train/eval mode is restored afterwards.
    """
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    ids = (torch.arange(sum(PROBE_LENGTHS), device=device) + vocab // 2) % vocab
    alone = ids.split(PROBE_LENGTHS)
    positions = torch.cat([torch.arange(n, device=device) for n in PROBE_LENGTHS])[None]
    scope, extra = (varlen_attention(model), {"cu_seq_lens_q": segment_bounds(positions)}) if varlen else (contextlib.nullcontext(), {})
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            reference = torch.cat([model(input_ids=seq[None], use_cache=False).logits[0] for seq in alone])
            with scope:
                packed = model(input_ids=ids[None], position_ids=positions, use_cache=False, **extra).logits[0]
    finally:
        for module, training in modes.items():
            module.training = training
    return bool((packed - reference).abs().max() <= TOLERANCE * reference.abs().max())
