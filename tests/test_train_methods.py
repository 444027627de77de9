"""Every method trains on a tiny model from a recipe: the held-out loss falls."""

import json

import pytest
import torch

from tests.train_helpers import record_final_logits, train, write_chat_data, write_label_data

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
    "lora+freeze+dropout": "{freeze: {embeddings: true}, lora: {r: 4}, dropout: {attention: 0.1}}",
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


def test_dora_trains_magnitudes_and_its_run_reloads_as_the_model_it_trained(tmp_path, monkeypatch):
    from tunelab.models import load_run

    data = write_chat_data(tmp_path / "d.jsonl")
    ids = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    final = record_final_logits(monkeypatch, ids)
    train(
        tmp_path,
        f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\nmethod: {CAUSAL_METHODS['dora']}\n"
        "train: {lr: 0.01, max_steps: 6, batch_size: 8, schedule: constant, precision: fp32}\n",
    )
    adapter = tmp_path / "run" / "final" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    model, _, _ = load_run(tmp_path / "run")
    dora = [m for m in model.modules() if getattr(m, "use_dora", {}).get("default")]
    assert len(dora) == 14  # every linear of the 2 blocks
    # DoRA starts each magnitude at its weight's row norms; training moved them.
    assert any(not torch.allclose(m.lora_magnitude_vector["default"].weight, m.get_base_layer().weight.norm(dim=1)) for m in dora)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, final.logits)


@pytest.mark.parametrize("rslora,scaling", [(True, 16 / 4**0.5), (False, 16 / 4)])
def test_rslora_scales_by_alpha_over_root_r(rslora, scaling):
    from peft.tuners.lora import LoraLayer

    from tunelab.methods import apply_methods
    from tunelab.methods.config import MethodConfig
    from tunelab.models import load_model

    cfg = MethodConfig.model_validate({"lora": {"r": 4, "alpha": 16, "use_rslora": rslora, "target_modules": "all-linear"}})
    model = apply_methods(load_model("tiny-llama").model, cfg, model_task="causal-lm")
    scalings = [m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(scalings) == 14 and all(s == pytest.approx(scaling, rel=1e-12) for s in scalings)


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


def dropout_rates(model: torch.nn.Module) -> dict[str, float]:
    """Every dropout rate the model holds: each ``nn.Dropout``'s p and each float ``*dropout`` attribute."""
    rates = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            rates[name] = module.p
        rates.update({f"{name}.{key}": value for key, value in vars(module).items() if "dropout" in key and isinstance(value, float)})
    return rates


def with_dropout(alias: str, task: str, dropout: dict[str, float], **config: object) -> torch.nn.Module:
    from tunelab.methods.dropout import apply_dropout
    from tunelab.methods.config import DropoutConfig
    from tunelab.models import load_model

    return apply_dropout(load_model(alias, task, **config).model, DropoutConfig(**dropout))


@pytest.mark.parametrize(
    "alias,task,key,config_key,extra",
    [
        ("tiny-llama", "causal-lm", "attention", "attention_dropout", {}),
        ("tiny-bert", "sequence-classification", "hidden", "hidden_dropout_prob", {"num_labels": 2}),
        ("tiny-bert", "sequence-classification", "hidden", "hidden_dropout_prob", {"num_labels": 2, "classifier_dropout": 0.05}),
        ("tiny-bert", "masked-lm", "attention", "attention_probs_dropout_prob", {}),
        ("tiny-bloom", "causal-lm", "hidden", "hidden_dropout", {}),
        ("tiny-bloom", "token-classification", "hidden", "hidden_dropout", {"num_labels": 2}),
        ("tiny-bloom", "causal-lm", "attention", "attention_dropout", {}),
    ],
)
def test_dropout_override_equals_building_the_model_with_that_rate(alias, task, key, config_key, extra):
    from tunelab.models import load_model

    overridden = with_dropout(alias, task, {key: 0.3}, **extra)
    built = load_model(alias, task, **{config_key: 0.3}, **extra).model
    assert 0.3 in dropout_rates(built).values()
    assert dropout_rates(overridden) == dropout_rates(built)
    assert getattr(overridden.config, config_key) == 0.3


def test_bert_hidden_dropout_after_attention_takes_the_hidden_rate():
    layer = with_dropout("tiny-bert", "base", {"hidden": 0.3, "attention": 0.2}).encoder.layer[0]
    assert layer.attention.output.dropout.p == 0.3  # BertSelfOutput: hidden states, under "attention"
    assert layer.output.dropout.p == 0.3
    assert layer.attention.self.dropout.p == 0.2  # attention probabilities


@pytest.mark.parametrize(
    "alias,task,key",
    [("tiny-llama", "causal-lm", "attention"), ("tiny-bert", "base", "hidden"), ("tiny-bert", "base", "attention"),
     ("tiny-bloom", "causal-lm", "hidden"), ("tiny-bloom", "causal-lm", "attention")],
)
def test_a_train_mode_forward_differs_from_eval_only_with_a_nonzero_rate(alias, task, key):
    ids = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    roles = ("attention",) if alias == "tiny-llama" else ("hidden", "attention")  # Llama has no hidden dropout

    def outputs(dropout: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
        model = with_dropout(alias, task, dropout)
        with torch.no_grad():
            trained = model.train()(ids)[0]
            return trained, model.eval()(ids)[0]

    assert torch.equal(*outputs({role: 0.0 for role in roles}))
    assert not torch.allclose(*outputs({**{role: 0.0 for role in roles}, key: 0.3}))


def test_hidden_dropout_on_llama_is_refused_with_what_to_do():
    from tunelab.errors import UserError

    with pytest.raises(UserError) as error:
        with_dropout("tiny-llama", "causal-lm", {"hidden": 0.1})
    message = str(error.value)
    assert "method.dropout.hidden" in message and "llama" in message and "remove" in message


def test_dropout_on_an_architecture_without_a_rate_table_is_refused():
    from transformers import AutoModelForCausalLM, GPT2Config

    from tunelab.errors import UserError
    from tunelab.methods.config import DropoutConfig
    from tunelab.methods.dropout import apply_dropout

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UserError, match="gpt2"):
        apply_dropout(model, DropoutConfig(attention=0.1))
