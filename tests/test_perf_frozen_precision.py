"""Frozen weights in the autocast dtype: only frozen ones, restored after training, same result."""

import torch
from peft import LoraConfig, get_peft_model

from tests.train_helpers import write_chat_data
from tunelab.data import DataConfig, build_datasets, collate_packed
from tunelab.hardware import PrecisionChoice
from tunelab.models import load_model
from tunelab.train.config import TrainConfig
from tunelab.train.frozen_precision import cast_frozen, restore
from tunelab.train.loop import Trainer
from tunelab.train.objectives.causal_lm import CausalLMObjective


def lora_model():
    model = load_model("tiny-llama", seed=1).model
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))


def test_cast_touches_frozen_weights_only_and_restores():
    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    original = cast_frozen(model, torch.bfloat16)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    restore(original)
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32
        # frozen values keep the bf16 rounding they trained with; trainable ones are untouched
        tolerance = 0 if param.requires_grad else 2**-7
        assert torch.allclose(param, before[name], rtol=tolerance, atol=0), name


def train_steps(tmp_path, low_precision: bool) -> tuple[list[float], dict[str, torch.Tensor], torch.nn.Module]:
    """Four bf16 steps on toy chat data; per-step losses, the adapters, the model."""
    torch.manual_seed(0)
    model = lora_model()
    tokenizer = load_model("tiny-llama").tokenizer
    data = build_datasets(DataConfig(train=str(write_chat_data(tmp_path / "d.jsonl")), val_fraction=0.0), tokenizer, shape="sft", seed=0)
    cfg = TrainConfig(max_steps=4, batch_size=8, lr=0.01, eval_before=False, save_every=100)
    trainer = Trainer(
        model=model, objective=CausalLMObjective(model), train=data.train, validation=[], cfg=cfg, collate=collate_packed,
        precision=PrecisionChoice("bf16", "test"), run_dir=tmp_path / f"run{int(low_precision)}", show_progress=False,
        low_precision_frozen=low_precision,
    )
    result = trainer.fit()
    losses = [r["loss"] for r in result.history if r["type"] == "train"]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, model


def test_training_with_low_precision_frozen_weights_matches_and_restores(tmp_path):
    plain_losses, _, _ = train_steps(tmp_path, low_precision=False)
    losses, lora, model = train_steps(tmp_path, low_precision=True)
    assert all(abs(a - b) / b < 0.02 for a, b in zip(losses, plain_losses)), (losses, plain_losses)
    assert all(p.dtype == torch.float32 for p in model.parameters()), "frozen weights restored to fp32 after fit"
    assert all(v.dtype == torch.float32 for v in lora.values()), "adapters train in fp32"
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k), "adapters were trained"


def adapter_step(model, skip: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], set[torch.dtype]]:
    """One bf16-autocast forward/backward with peft's adapter-input cast on or off: loss, grads, lora_A input dtypes."""
    changed = cast_frozen(model, torch.bfloat16)
    if not skip:
        for layer in changed.adapter_layers:
            layer.cast_input_dtype_enabled = True
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.add(args[0].dtype)) for n, m in model.named_modules() if n.endswith("lora_A.default")]
    ids = torch.randint(7, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # same dropout masks for both settings
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for hook in hooks:
        hook.remove()
    model.zero_grad(set_to_none=True)
    restore(changed)
    assert len(changed.adapter_layers) == 14 and all(layer.cast_input_dtype_enabled for layer in changed.adapter_layers)
    return loss.detach(), grads, seen


def test_skipping_the_adapter_input_cast_gives_identical_losses_and_gradients():
    """bf16 -> fp32 -> bf16 is exact, so dropping peft's fp32 copy of adapter inputs changes no number."""
    model = lora_model()  # peft's default: no LoRA dropout
    loss_a, grads_a, dtypes_a = adapter_step(model, skip=False)
    loss_b, grads_b, dtypes_b = adapter_step(model, skip=True)
    # the copy really is gone: o_proj/down_proj read bf16 (attention and MLP outputs); the others read
    # the fp32 residual stream's norms, which needed no copy
    assert dtypes_a == {torch.float32} and dtypes_b == {torch.float32, torch.bfloat16}
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_with_lora_dropout_skipping_the_cast_stays_within_bf16_rounding():
    model = load_model("tiny-llama", seed=1).model
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.05, task_type="CAUSAL_LM"))
    for module in model.modules():  # non-zero adapters, so the adapter path contributes
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
    loss_a, grads_a, _ = adapter_step(model, skip=False)
    loss_b, grads_b, _ = adapter_step(model, skip=True)
    assert torch.allclose(loss_a, loss_b, rtol=1e-3)
    for k in grads_a:
        assert (grads_a[k] - grads_b[k]).norm() <= 0.02 * grads_a[k].norm(), k


def test_the_residual_stream_stays_fp32_while_the_embedding_table_is_bf16():
    """A bf16 stream is rounded after every residual add, which biased the loss by -0.9% (frozen_precision's docstring)."""
    model = lora_model()
    ids = torch.tensor([[5, 9, 17, 33]])
    original = cast_frozen(model, torch.bfloat16)
    embedding = model.get_input_embeddings()
    assert embedding.weight.dtype == torch.bfloat16
    assert embedding(ids).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert all(h.dtype == torch.float32 for h in hidden[:-1])  # every layer's stream (the last is the final norm's output)
    restore(original)
    assert embedding(ids).dtype == torch.float32 and not embedding._forward_hooks
