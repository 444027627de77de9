"""The recipe's ``model:`` section: every key it accepts changes what is built."""

from __future__ import annotations

import pytest
import torch

from tests.train_helpers import recipe_for, write_chat_data
from tunelab.errors import UserError
from tunelab.models import load_model
from tunelab.train.objectives.causal_lm import CausalLMObjective
from tunelab.train.prepare import prepare


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[40, 41, 42, 43, 44, 45], [50, 51, 52, 53, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits * mask[..., None]


@pytest.mark.parametrize(("name", "task"), [("tiny-llama", "causal-lm"), ("tiny-bert", "masked-lm")])
def test_attn_implementation_builds_the_model_with_that_kernel(name, task):
    eager, sdpa = (load_model(name, task, attn_implementation=kernel).model.eval() for kernel in ("eager", "sdpa"))
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(eager), logits(sdpa), rtol=0, atol=1e-5)


def test_attn_implementation_reaches_models_loaded_from_a_directory(tmp_path):
    load_model("tiny-llama").model.save_pretrained(tmp_path)
    load_model("tiny-llama").tokenizer.save_pretrained(tmp_path)
    assert load_model(str(tmp_path), attn_implementation="eager").model.config._attn_implementation == "eager"


def test_recipe_attn_implementation_is_what_training_runs(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    recipe = recipe_for(tmp_path, f"model: {{name: tiny-llama, attn_implementation: eager}}\ndata: {{train: {data}}}\n")
    prepared = prepare(recipe)
    assert prepared.model.config._attn_implementation == "eager"
    # eager keeps eager on packed rows too: per-example attention is the sdpa form only
    assert prepared.objective.collation == "packed" and not prepared.objective.varlen
    assert CausalLMObjective(load_model("tiny-llama", attn_implementation="sdpa").model).varlen


def test_a_kernel_the_architecture_lacks_is_a_user_error():
    with pytest.raises(UserError, match=r"model\.attn_implementation 'sdpa'.*BloomForCausalLM") as caught:
        load_model("tiny-bloom", attn_implementation="sdpa")
    assert "eager" in caught.value.hint


def test_model_kind_is_not_a_recipe_key(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'model\.kind'"):
        recipe_for(tmp_path, "model: {name: tiny-llama, kind: encoder}\n")
