"""The loop's guarantees: exact resume, exact data parallelism, PEFT-compatible saves, exact merges."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train_helpers import recipe_for, train, write_chat_data
from tunelab.train.run import run_training

LORA_RUN = (
    "model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.1}}\n"
    "method: {{lora: {{r: 4, target_modules: all-linear, dropout: 0.1}}}}\n"
    "train: {{lr: 0.01, batch_size: 4, precision: fp32, warmup_steps: 2, eval_every: 5}}\n"
)


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "adapter" / "adapter_model.safetensors"))


def test_resume_is_bit_exact(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    straight = tmp_path / "straight"
    straight.mkdir()
    run_training(recipe_for(straight, LORA_RUN.format(data=data), "train.max_steps=10"), show_progress=False)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    first = recipe_for(resumed, LORA_RUN.format(data=data), "train.max_steps=10")
    # Ctrl-C after step 5 of the same 10-step schedule: the trainer checkpoints step 5 and stops.
    from tunelab.train import run as run_module
    from tunelab.train.callbacks import Callback

    class CtrlCAfterStep5(Callback):
        def on_step_end(self, state):
            if state.step == 5:
                raise KeyboardInterrupt

    original = run_module.callbacks_for
    run_module.callbacks_for = lambda recipe: [CtrlCAfterStep5()]
    try:
        with pytest.raises(KeyboardInterrupt):
            run_training(first, show_progress=False)
    finally:
        run_module.callbacks_for = original
    assert not (resumed / "run" / "final").exists()
    assert (resumed / "run" / "checkpoints" / "step-0000005").exists()
    # ...then resume from the step-5 checkpoint and finish.
    from tunelab.train.run import load_run_recipe

    run_training(load_run_recipe(resumed / "run"), resume=True, show_progress=False)
    a, b = final_adapter(straight / "run"), final_adapter(resumed / "run")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


def test_interrupted_checkpoint_write_leaves_previous_intact(tmp_path):
    from tunelab import atomic

    target = tmp_path / "ckpt"
    with atomic.directory(target) as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.directory(target) as tmp:
            (tmp / "w").write_text("half")
            raise RuntimeError("killed")
    assert (target / "w").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_peft_loads_our_adapter_and_merged_export_matches(tmp_path):
    from peft import PeftModel

    from tunelab.export.merged import export_merged
    from tunelab.models import load_model, load_run

    data = write_chat_data(tmp_path / "d.jsonl")
    train(tmp_path, LORA_RUN.format(data=data), "train.max_steps=8")
    run_dir = tmp_path / "run"
    ours, tokenizer, _ = load_run(run_dir)
    base = load_model("tiny-llama").model
    theirs = PeftModel.from_pretrained(base, str(run_dir / "final" / "adapter")).eval()
    ids = tokenizer("<|im_start|>user\nsay yes<|im_end|>", return_tensors="pt")["input_ids"]
    merged_dir = export_merged(run_dir, tmp_path / "merged")
    merged = load_model(str(merged_dir)).model.eval()
    with torch.no_grad():
        unmerged_logits = ours(ids).logits
        assert torch.allclose(theirs(ids).logits, unmerged_logits)
        assert torch.allclose(merged(ids).logits, unmerged_logits, atol=1e-4)
    assert not any("lora" in k for k in merged.state_dict())


def test_bottleneck_run_reloads(tmp_path):
    from tunelab.models import load_run

    data = write_chat_data(tmp_path / "d.jsonl")
    summary = train(
        tmp_path,
        f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\nmethod: {{bottleneck: {{reduction_factor: 4}}}}\n"
        "train: {lr: 0.03, max_steps: 6, batch_size: 8, precision: fp32}\n",
    )
    model, tokenizer, manifest = load_run(tmp_path / "run")
    assert "bottleneck.safetensors" in manifest["files"]
    saved = load_file(str(tmp_path / "run" / "final" / "bottleneck.safetensors"))
    live = {k: v for k, v in model.state_dict().items() if ".bottleneck_" in k}
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".up." in k), "adapters were trained"
    assert summary.steps == 6


def test_early_stopping_stops(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    summary = train(
        tmp_path,
        f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\nmethod: {{lora: {{r: 4}}}}\n"
        "train: {lr: 1.0e-9, max_steps: 40, batch_size: 4, precision: fp32, eval_every: 2,"
        " early_stopping: {metric: eval_loss, patience: 2, min_delta: 0.01}}\n",
    )
    assert summary.steps == 6 and "early stopping" in summary.stop_reason


def test_metrics_jsonl_and_loss_curve(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    train(tmp_path, LORA_RUN.format(data=data), "train.max_steps=6")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 for r in records if r["type"] == "train")
    assert (tmp_path / "run" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run" / "recipe.yaml").exists() and (tmp_path / "run" / "summary.json").exists()
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["peak_rss_bytes"] > 50 * 2**20  # torch alone holds more; a zero would mean it went unmeasured
    assert saved["device"] == "cpu" and saved["peak_device_bytes"] == 0  # a GPU run names its GPU and its allocation peak


@pytest.mark.parametrize("sampler", ["", "sampler: {{name: importance, refresh_every: 2}}\n"], ids=["shuffle", "importance"])
def test_ddp_two_processes_equal_one_process_on_doubled_batch(tmp_path, sampler):
    """Importance sampling too: each process scores half the examples, the draws and weights agree."""
    data = write_chat_data(tmp_path / "d.jsonl")
    recipe = (
        "model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.1}}\nmethod: {{lora: {{r: 4, dropout: 0.0}}}}\n"
        "train: {{lr: 0.01, max_steps: 4, batch_size: {bs}, precision: fp32, eval_before: false}}\noutput_dir: {out}\n" + sampler
    )
    single = tmp_path / "single.yaml"
    single.write_text(recipe.format(data=data, bs=8, out=tmp_path / "one"))
    double = tmp_path / "ddp.yaml"
    double.write_text(recipe.format(data=data, bs=4, out=tmp_path / "two"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "tunelab.cli", "train", "--no-progress"]
    subprocess.run([*cli, str(single)], check=True, env=env, capture_output=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", "-m", "tunelab.cli", "train", "--no-progress"]
    proc = subprocess.run([*launcher, str(double)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = final_adapter(tmp_path / "one"), final_adapter(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert sum(1 for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"train"' in line) == 4


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Loss summed over supervised tokens and divided by the whole step's count: 2 x 4 == 1 x 8."""
    data = write_chat_data(tmp_path / "d.jsonl")
    recipe = LORA_RUN.replace("dropout: 0.1", "dropout: 0.0").format(data=data)
    runs = {}
    for name, overrides in {"big": ("train.batch_size=8",), "accumulated": ("train.batch_size=4", "train.grad_accum=2")}.items():
        (tmp_path / name).mkdir()
        runs[name] = train(tmp_path / name, recipe, "train.max_steps=4", *overrides)
    losses = {name: [r["loss"] for r in run.history if r.get("type") == "train"] for name, run in runs.items()}
    assert losses["accumulated"] == pytest.approx(losses["big"], rel=1e-5)
    big, accumulated = final_adapter(tmp_path / "big" / "run"), final_adapter(tmp_path / "accumulated" / "run")
    # equal up to float summation order (measured max difference 2e-5 on weights of size ~0.1)
    assert all(torch.allclose(big[k], accumulated[k], atol=1e-4) for k in big)


def test_only_the_last_checkpoints_and_the_best_are_kept(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    summary = train(tmp_path, LORA_RUN.format(data=data), "train.max_steps=10", "train.save_every=2", "train.keep_last=2")
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    best = Path(summary.best_checkpoint).name
    assert set(kept) == {"step-0000008", "step-0000010", best}
