"""QLoRA: LoRA adapters learn on top of a frozen NF4 base."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from tunelab.compress.qlora import nf4_base
from tunelab.models import load_model


def test_lora_trains_on_a_frozen_nf4_base():
    import bitsandbytes as bnb

    base = nf4_base(load_model("tiny-llama", seed=0).model)
    quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(7, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert not any(p.requires_grad for layer in quantized for p in layer.parameters())
