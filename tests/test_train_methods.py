"""Every method trains on a tiny model from a recipe: the held-out loss falls."""

import pytest
import torch

from tests.train_helpers import train, write_chat_data, write_label_data

CAUSAL_METHODS = {
    "full": "{}",
    "freeze": "{freeze: {embeddings: true, first_n: 1}}",
    "lora": "{lora: {r: 8, target_modules: all-linear}}",
    "qlora": "{lora: {r: 8, target_modules: all-linear, qlora: true}}",
    "dora": "{lora: {r: 8, use_dora: true, target_modules: all-linear}}",
    "rslora": "{lora: {r: 8, use_rslora: true, target_modules: all-linear}}",
    "ia3": "{ia3: {}}",
    "prompt_tuning": "{prompt_tuning: {num_virtual_tokens: 8}}",
    "prefix_tuning": "{prefix_tuning: {num_virtual_tokens: 8}}",
    "houlsby": "{bottleneck: {style: houlsby, reduction_factor: 4}}",
    "pfeiffer": "{bottleneck: {style: pfeiffer, reduction_factor: 4}}",
    "lora+freeze+dropout": "{freeze: {embeddings: true}, lora: {r: 4}, dropout: {hidden: 0.0, attention: 0.0}}",
}
MIN_DROP = {"prompt_tuning": 0.1}
LEARNING_RATES = {"ia3": 0.1, "prompt_tuning": 0.3, "prefix_tuning": 0.05, "full": 0.003, "freeze": 0.003, "houlsby": 0.03, "pfeiffer": 0.03}


# Every method on Llama; the main mechanisms again on BLOOM (a different block layout).
CASES = [("tiny-llama", name) for name in sorted(CAUSAL_METHODS)] + [("tiny-bloom", n) for n in ("full", "lora", "houlsby")]


@pytest.mark.parametrize("model,name", CASES)
def test_causal_lm_methods_reduce_eval_loss(tmp_path, name, model):
    data = write_chat_data(tmp_path / "d.jsonl")
    lr = LEARNING_RATES.get(name, 0.01)
    summary = train(
        tmp_path,
        f"model: {{name: {model}}}\ndata: {{train: {data}, val_fraction: 0.15}}\nmethod: {CAUSAL_METHODS[name]}\n"
        f"train: {{lr: {lr}, max_steps: 30, batch_size: 8, schedule: constant, precision: fp32}}\n",
    )
    before, after = summary.eval_before["eval_loss"], summary.eval_after["eval_loss"]
    # Perplexity down >25% (>10% for prompt tuning, which trains only 8 x 64 soft-prompt values).
    assert after < before - MIN_DROP.get(name, 0.3), f"{name}: eval loss {before:.3f} -> {after:.3f}"
    if name not in {"full", "freeze"}:
        assert summary.trainable_params < summary.total_params * 0.5


@pytest.mark.parametrize(
    "model,base",
    # A frozen *random* BERT's CLS vector carries too little of the words for a linear head;
    # frozen-base head training is covered on tiny-llama here and in test_objectives_heads.py.
    [("tiny-llama", "true"), ("tiny-llama", "false"), ("tiny-bert", "false")],
)
def test_classification_head_learns(tmp_path, model, base):
    data = write_label_data(tmp_path / "d.jsonl", n=160)
    summary = train(
        tmp_path,
        f"model: {{name: {model}}}\ndata: {{train: {data}, val_fraction: 0.2}}\nmethod: {{head: {{}}, freeze: {{base: {base}}}}}\n"
        f"train: {{lr: 0.01, max_steps: 40, batch_size: 16, schedule: constant, precision: fp32}}\n",
    )
    assert summary.eval_after["eval_loss"] < summary.eval_before["eval_loss"]
    assert summary.eval_after["eval_accuracy"] >= 0.8, summary.eval_after
    if base == "true":
        assert summary.trainable_params < 1000  # the head only


def test_head_with_lora_trains_head_and_adapters(tmp_path):
    data = write_label_data(tmp_path / "d.jsonl", n=160)
    summary = train(
        tmp_path,
        f"model: {{name: tiny-bert}}\ndata: {{train: {data}, val_fraction: 0.2}}\nmethod: {{head: {{}}, lora: {{r: 4, target_modules: [query, value]}}}}\n"
        "train: {lr: 0.01, max_steps: 40, batch_size: 16, schedule: constant, precision: fp32}\n",
    )
    assert summary.eval_after["eval_accuracy"] >= 0.8


def test_bottleneck_starts_at_the_base_model():
    from tunelab.methods import apply_methods
    from tunelab.methods.config import MethodConfig
    from tunelab.models import load_model

    for alias, task in (("tiny-llama", "causal-lm"), ("tiny-bert", "base")):
        loaded = load_model(alias, task)
        loaded.model.eval()  # BERT's dropout would make two calls differ
        ids = loaded.tokenizer("adapters start as identity", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            before = loaded.model(ids)[0]
            model = apply_methods(loaded.model, MethodConfig.model_validate({"bottleneck": {}}), model_task=task)
            after = model(ids)[0]
        assert torch.equal(before, after)
        assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == sum(
            p.numel() for n, p in model.named_parameters() if ".bottleneck_" in n
        )


def test_freezing_prefix_blocks_skips_their_backward(tmp_path):
    from tunelab.methods.config import FreezeConfig
    from tunelab.methods.freeze import apply_freeze
    from tunelab.models import load_model

    model = load_model("tiny-llama").model
    apply_freeze(model, FreezeConfig(embeddings=True, first_n=1))
    ids = torch.randint(10, 200, (1, 16))
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        frozen = "layers.0." in name or "embed_tokens" in name
        assert (param.grad is None) == frozen, name
