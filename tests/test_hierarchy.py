"""Hierarchical adapters: a family stack adds to the shared adapter, batches train their family's
stack only, the run saves and reloads every stack and its router, and evaluation answers each item
with its family's stack."""

import json
from pathlib import Path

import peft
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tests.test_meta_learning import write_tasks
from tests.train_helpers import recipe_for, train
from tunelab.cli import cli
from tunelab.errors import UserError
from tunelab.generate import GenerationSettings, encode_prompt, generate
from tunelab.methods import apply_methods
from tunelab.methods.hierarchy_router import prompt_embeddings, route
from tunelab.methods.hierarchy_stacks import (
    adapter_name,
    hierarchy_of,
    merge_stack,
    use_stack,
)
from tunelab.models import load_model
from tunelab.recipe import recipe_from_dict

FAMILIES = {"warm": ["t0", "t3"], "cool": ["t1", "t2"]}  # write_tasks: t0 red, t1 blue, t2 green, t3 gold


def hierarchical(shared: bool = True) -> torch.nn.Module:
    section = recipe_from_dict({"method": {"lora": {"r": 4, "target_modules": "all-linear"}, "hierarchy": {"families": FAMILIES, "shared": shared}}}).method
    return apply_methods(load_model("tiny-llama").model, section, model_task="causal-lm")


def adapter_parameters(model: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if f".{adapter}." in n]


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_stack_with_a_zero_family_adapter_equals_the_shared_adapter_alone():
    torch.manual_seed(0)
    model = hierarchical().eval()
    for param in adapter_parameters(model, "default"):  # a trained shared adapter (B no longer zero)
        torch.nn.init.normal_(param, std=0.05)
    ids = torch.randint(3, 200, (2, 9))
    with use_stack(model, None):
        shared_alone = logits(model, ids)
    with peft.PeftModel.disable_adapter(model):
        base = logits(model, ids)
    assert not torch.allclose(shared_alone, base, atol=1e-4), "the shared adapter changes the output"
    with use_stack(model, "warm"):  # family B = 0 at initialisation: the stack is the shared adapter
        assert torch.equal(logits(model, ids), shared_alone)
    for param in adapter_parameters(model, adapter_name("warm")):
        torch.nn.init.normal_(param, std=0.05)
    with use_stack(model, "warm"):
        stacked = logits(model, ids)
    assert not torch.allclose(stacked, shared_alone, atol=1e-4), "a trained family adapter adds to the shared one"
    with use_stack(model, "cool"):
        assert torch.equal(logits(model, ids), shared_alone), "the other family's adapter is still zero"
    merged = merge_stack(model, "warm")
    assert not isinstance(merged, peft.PeftModel)
    assert torch.allclose(logits(merged, ids), stacked, atol=1e-4), "the merged stack computes what the stack computed"


def test_a_batch_trains_its_family_stack_and_switching_keeps_every_adapter_trainable():
    torch.manual_seed(0)
    model = hierarchical().train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".default." in n for n in trainable) and any(adapter_name("cool") in n for n in trainable)
    ids = torch.randint(3, 200, (2, 9))
    with use_stack(model, "cool"):
        model(input_ids=ids, labels=ids).loss.backward()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable, "set_adapter's freezing is undone"
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".default." in n for n in got_grad) and any(adapter_name("cool") in n for n in got_grad)
    assert not any(adapter_name("warm") in n for n in got_grad), "the other family's adapter gets no gradient"
    alone = hierarchical(shared=False)
    assert not any(p.requires_grad for p in adapter_parameters(alone, "default")), "shared: false trains the family adapters alone"
    with use_stack(alone, None), torch.no_grad():  # no shared adapter, no family: the base model
        assert torch.equal(alone(input_ids=ids).logits, load_model("tiny-llama").model(input_ids=ids).logits)


HIERARCHY_RUN = """model: {{name: tiny-llama}}
data: {{train: {data}, task_column: task, val_fraction: 0.25}}
method:
  lora: {{r: 4, target_modules: all-linear}}
  hierarchy: {{families: {{warm: [t0, t3], cool: [t1, t2]}}, router_examples: 8}}
train: {{lr: 0.01, max_steps: 6, precision: fp32, batch_size: 4}}
"""


def write_eval_items(path: Path) -> Path:
    rows = [{"prompt": f"{i} {word}", "answer": answer, "choices": ["APPLE", "SEA", "LEAF", "SUN"], "task": task}
            for i, (task, word, answer) in enumerate([("t0", "red", "APPLE"), ("t1", "blue", "SEA"), ("t2", "green", "LEAF"), ("t3", "gold", "SUN")])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_hierarchical_run_trains_one_family_per_batch_saves_every_stack_and_evaluates_by_family(tmp_path):
    data = write_tasks(tmp_path / "tasks.jsonl")
    recipe = recipe_for(tmp_path, HIERARCHY_RUN.format(data=data))
    from tunelab.train.prepare import prepare

    prepared = prepare(recipe)
    batches = prepared.sampler.batches(0)
    examples = prepared.data.train
    assert all(len({examples[i].task for i in batch}) == 1 for batch in batches), "every micro-batch is one family's"
    assert {examples[i].task for batch in batches for i in batch} == {0, 1}
    assert prepared.collate([examples[i] for i in batches[0]])["hierarchy_family"].item() == examples[batches[0][0]].task

    summary = train(tmp_path, HIERARCHY_RUN.format(data=data))
    assert summary.steps == 6
    final = tmp_path / "run" / "final"
    assert (final / "adapter" / adapter_name("warm") / "adapter_model.safetensors").exists()
    assert (final / "hierarchy.safetensors").exists()

    loaded = load_model(str(tmp_path / "run")).model
    state = hierarchy_of(loaded)
    assert state is not None and state.families == ["warm", "cool"] and state.centroids.shape[0] == 2

    items = write_eval_items(tmp_path / "items.jsonl")
    out = tmp_path / "eval"
    args = ["eval", "--data", str(items), "--run", str(tmp_path / "run"), "--task", "choice", "--answer-field", "answer"]
    result = CliRunner().invoke(cli, [*args, "--task-field", "task", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in next(out.glob("predictions-*.jsonl")).read_text().splitlines()]
    assert [r["family"] for r in records] == ["warm", "cool", "cool", "warm"] and not any(r["routed"] for r in records)
    routed_out = tmp_path / "eval_routed"
    result = CliRunner().invoke(cli, [*args, "--out", str(routed_out)])
    assert result.exit_code == 0, result.output
    routed = [json.loads(line) for line in next(routed_out.glob("predictions-*.jsonl")).read_text().splitlines()]
    assert all(r["routed"] and r["family"] in ("warm", "cool") for r in routed)


def test_hierarchy_errors_name_the_setting(tmp_path):
    data = write_tasks(tmp_path / "tasks.jsonl")
    with pytest.raises(Exception, match="put it in one"):
        recipe_from_dict({"method": {"lora": {}, "hierarchy": {"families": {"a": ["t0"], "b": ["t0"]}}}})
    with pytest.raises(UserError, match="set method.lora"):
        apply_methods(load_model("tiny-llama").model, recipe_from_dict({"method": {"hierarchy": {"families": FAMILIES}}}).method, model_task="causal-lm")
    with pytest.raises(UserError, match="no family"):
        train(tmp_path, HIERARCHY_RUN.format(data=data).replace("cool: [t1, t2]", "cool: [t1]"))
    with pytest.raises(UserError, match="would mix families"):
        train(tmp_path, HIERARCHY_RUN.format(data=data) + "sampler: {name: sequential}\n")
    with pytest.raises(UserError, match="task_column"):
        train(tmp_path, HIERARCHY_RUN.format(data=data).replace("task_column: task, ", ""))


def test_activation_checkpointing_recomputes_each_batch_under_its_own_family_stack(tmp_path):
    """The recomputed forward in the backward pass must see the batch's stack, not the last one set:
    the adapters trained with checkpointing equal those trained without."""
    data = write_tasks(tmp_path / "tasks.jsonl")
    adapters = []
    for checkpointing in (False, True):
        run = tmp_path / f"gc{checkpointing}"
        run.mkdir()
        train(run, HIERARCHY_RUN.format(data=data).replace("max_steps: 6", f"max_steps: 3, gradient_checkpointing: {str(checkpointing).lower()}"))
        adapters.append(load_file(str(run / "run" / "final" / "adapter" / adapter_name("cool") / "adapter_model.safetensors")))
    assert any(v.abs().sum() > 0 for k, v in adapters[0].items() if "lora_B" in k), "the family adapter trained"
    for key, value in adapters[0].items():
        assert torch.allclose(value, adapters[1][key], atol=1e-6), key


def test_the_router_picks_the_nearest_family_centroid_and_generation_runs_under_its_stack():
    torch.manual_seed(0)
    loaded = load_model("tiny-llama")
    section = recipe_from_dict({"method": {"lora": {"r": 4, "target_modules": "all-linear"}, "hierarchy": {"families": FAMILIES}}}).method
    model = apply_methods(loaded.model, section, model_task="causal-lm").eval()
    for name, param in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param, std=0.1)
    messages = [{"role": "user", "content": "hello there"}]
    prompt = encode_prompt(loaded.tokenizer, messages)[0].tolist()
    feature = prompt_embeddings(model, [prompt])[0]
    state = hierarchy_of(model)
    state.centroids = torch.stack([-feature, feature])  # "cool" (the second family) is the nearest
    assert route(model, [prompt]) == ["cool"]
    settings = GenerationSettings(max_new_tokens=6)
    with use_stack(model, "cool"):
        expected = generate(model, loaded.tokenizer, messages, settings)
    assert generate(model, loaded.tokenizer, messages, settings) == expected, "generation routes the prompt to its family"
    stacks = {}
    for family in ("warm", "cool"):
        with use_stack(model, family):
            stacks[family] = logits(model, torch.tensor([prompt]))
    assert not torch.allclose(stacks["warm"], stacks["cool"], atol=1e-4), "the two stacks compute different things"
