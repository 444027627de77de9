"""Vision-language training: rows with images, a tiny LLaVA assembled from parts, its stages."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    LlavaForConditionalGeneration,
)

from tests.train_helpers import train
from tunelab.data.build import build_datasets
from tunelab.data.bundle import IGNORE_INDEX
from tunelab.data.collate import collate_packed, collate_padded
from tunelab.data.config import DataConfig
from tunelab.errors import UserError
from tunelab.models.load import load_model
from tunelab.models.vision import image_inputs, vlm_parts
from tunelab.models.vlm_assemble import assemble_vlm

IMAGES = Path(__file__).resolve().parent.parent / "examples" / "data" / "images"


def tiny_encoder(folder: Path) -> Path:
    """A CLIP vision tower from a config (32x32 images, 16 patches) with its image processor."""
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vlm")
    lm = load_model("tiny-llama")
    return assemble_vlm(lm.model, lm.tokenizer, tiny_encoder(root / "encoder"), root / "vlm")


def digit_rows(folder: Path, n: int, shape: str = "shorthand") -> Path:
    """``n`` real digit images from the examples, copied into ``folder``, as chat rows."""
    rows = [json.loads(line) for line in (IMAGES / "train.jsonl").read_text().splitlines() if "digits/" in line][:n]
    (folder / "digits").mkdir(parents=True, exist_ok=True)
    out = []
    for row in rows:
        shutil.copy(IMAGES / row["image"], folder / row["image"])
        if shape == "parts":
            question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
            row = {"messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": row["image"]}}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": answer},
            ]}
        out.append(row)
    path = folder / f"{shape}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def test_assembled_vlm_reloads_with_transformers_own_class(tiny_vlm):
    loaded = load_model(str(tiny_vlm))
    plain = LlavaForConditionalGeneration.from_pretrained(tiny_vlm)
    assert type(loaded.model) is LlavaForConditionalGeneration
    inputs = image_inputs(loaded.model, loaded.tokenizer)
    assert inputs.placeholder == "<image>" and inputs.tokens_per_image == 16
    ids = torch.tensor([[5, 6] + [inputs.token_id] * 16 + [7, 8]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids, pixel_values=pixels).logits, plain(input_ids=ids, pixel_values=pixels).logits)


def test_content_parts_and_shorthand_encode_alike_with_image_tokens_unsupervised(tiny_vlm, tmp_path):
    loaded = load_model(str(tiny_vlm))
    inputs = image_inputs(loaded.model, loaded.tokenizer)
    bundles = [
        build_datasets(DataConfig(train=str(digit_rows(tmp_path, 6, shape)), val_fraction=0), loaded.tokenizer, shape="sft", seed=0, images=inputs)
        for shape in ("shorthand", "parts")
    ]
    for example in bundles[0].train:
        positions = [i for i, t in enumerate(example.input_ids) if t == inputs.token_id]
        assert len(positions) == 16 and positions == list(range(positions[0], positions[0] + 16))
        assert all(example.labels[i] == IGNORE_INDEX for i in positions)
        assert example.pixel_values.shape == (1, 3, 32, 32)
    # Parts put the image before the question as the shorthand does (parts joined by a newline).
    first, second = ({tuple(e.input_ids): e.pixel_values for e in b.train} for b in bundles)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_collation_keeps_images_in_placeholder_order_and_never_shares_them(tiny_vlm, tmp_path):
    loaded = load_model(str(tiny_vlm))
    inputs = image_inputs(loaded.model, loaded.tokenizer)
    examples = build_datasets(DataConfig(train=str(digit_rows(tmp_path, 4)), val_fraction=0), loaded.tokenizer, shape="sft", seed=0, images=inputs).train
    packed = collate_packed(examples, share_prefix=True)
    assert "segment_bounds" not in packed  # same question, same placeholder ids, different images
    assert torch.equal(packed["pixel_values"], torch.cat([e.pixel_values for e in examples]))
    padded = collate_padded(examples, pad_id=3)
    model = loaded.model
    with torch.no_grad():
        whole = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], pixel_values=padded["pixel_values"]).logits
        for row, example in enumerate(examples):
            alone = model(input_ids=torch.tensor([example.input_ids]), pixel_values=example.pixel_values).logits[0]
            torch.testing.assert_close(whole[row, : len(example.input_ids)], alone, atol=1e-5, rtol=1e-4)


def test_bad_image_rows_get_one_line_errors_naming_the_line(tiny_vlm, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"role": "assistant", "content": "7"}
    cases = [
        ({"image": "missing.png", "messages": [{"role": "user", "content": "q"}, good]}, "image not found"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}, good]}, "remote image"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}, good]}, "content part"),
    ]
    for row, message in cases:
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(UserError, match=message) as caught:
            build_datasets(DataConfig(train=str(path), val_fraction=0), load_model("tiny-llama").tokenizer, shape="sft", seed=0)
        assert f"{path}:1" in caught.value.one_line()
    vlm = load_model(str(tiny_vlm))
    (tmp_path / "not-an-image.png").write_text("hello")
    data_url = "data:image/png;base64," + base64.b64encode(b"hello").decode()
    for ref in ("not-an-image.png", data_url):
        path.write_text(json.dumps({"image": ref, "messages": [{"role": "user", "content": "q"}, good]}) + "\n")
        with pytest.raises(UserError, match="cannot read image"):
            build_datasets(DataConfig(train=str(path), val_fraction=0), vlm.tokenizer, shape="sft", seed=0, images=image_inputs(vlm.model, vlm.tokenizer))


def test_text_model_refuses_image_rows(tmp_path):
    with pytest.raises(UserError, match="reads text only"):
        build_datasets(DataConfig(train=str(digit_rows(tmp_path, 2)), val_fraction=0), load_model("tiny-llama").tokenizer, shape="sft", seed=0)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_projector_stage_trains_only_the_projector_and_its_run_reloads(tiny_vlm, tmp_path, monkeypatch):
    from tunelab.models import load_run

    data = digit_rows(tmp_path, 24)
    before = vlm_parts(load_model(str(tiny_vlm)).model)
    lm_before, tower_before = _weights(before["language_model"]), _weights(before["vision_tower"])
    summary = train(
        tmp_path, f"model: {{name: {tiny_vlm}}}\ndata: {{train: {data}, val_fraction: 0.2}}\nmethod: {{vision: {{train: [projector]}}}}\n"
        "train: {lr: 0.05, max_steps: 40, batch_size: 8, schedule: constant, precision: fp32}\n",
    )
    # A frozen random 2-layer LM is hard to steer through 16 input positions alone: a small drop.
    assert summary.eval_after["eval_loss"] < summary.eval_before["eval_loss"] - 0.05
    final = tmp_path / "run" / "final"
    assert (final / "vision.safetensors").exists() and not (final / "model").exists()
    model, _, _ = load_run(tmp_path / "run")
    after = vlm_parts(model)
    assert all(torch.equal(v, lm_before[k]) for k, v in after["language_model"].state_dict().items())
    assert all(torch.equal(v, tower_before[k]) for k, v in after["vision_tower"].state_dict().items())
    assert not all(torch.equal(v, before["projector"].state_dict()[k]) for k, v in after["projector"].state_dict().items())


def test_lora_stage_adapts_only_the_language_model_and_continues_the_projector(tiny_vlm, tmp_path):
    from tunelab.models import load_run

    data = digit_rows(tmp_path, 24)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    train(stage1, f"model: {{name: {tiny_vlm}}}\ndata: {{train: {data}, val_fraction: 0}}\nmethod: {{vision: {{train: [projector]}}}}\n"
          "train: {lr: 0.01, max_steps: 5, batch_size: 8, schedule: constant, precision: fp32}\n")
    summary = train(
        tmp_path, f"model: {{name: {stage1 / 'run'}}}\ndata: {{train: {data}, val_fraction: 0.2}}\n"
        "method: {lora: {r: 4, target_modules: all-linear}, vision: {train: [projector]}}\n"
        "train: {lr: 0.01, max_steps: 15, batch_size: 8, schedule: constant, precision: fp32}\n",
    )
    losses = [r["loss"] for r in summary.history if r.get("type") == "train"]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3  # 19 rows: it fits them (held-out loss is noise here)
    config = json.loads((tmp_path / "run" / "final" / "adapter" / "adapter_config.json").read_text())
    assert "language_model" in config["target_modules"]
    model, _, _ = load_run(tmp_path / "run")
    lora_modules = [name for name, _ in model.named_modules() if name.endswith("lora_A")]
    assert lora_modules and all("language_model" in name for name in lora_modules)


def test_training_the_language_model_too_writes_a_llava_checkpoint_transformers_loads(tiny_vlm, tmp_path):
    from tunelab.models import load_run

    data = digit_rows(tmp_path, 24)
    summary = train(
        tmp_path, f"model: {{name: {tiny_vlm}}}\ndata: {{train: {data}, val_fraction: 0.2}}\nmethod: {{vision: {{train: [projector, language_model]}}}}\n"
        "train: {lr: 0.01, max_steps: 20, batch_size: 8, schedule: constant, precision: fp32}\n",
    )
    assert summary.eval_after["eval_loss"] < summary.eval_before["eval_loss"] - 1.0
    saved = tmp_path / "run" / "final" / "model"
    plain = LlavaForConditionalGeneration.from_pretrained(saved)
    model, tokenizer, _ = load_run(tmp_path / "run")
    inputs = image_inputs(model, tokenizer)  # the image processor was saved with the model
    ids = torch.tensor([[5, 6] + [inputs.token_id] * 16 + [7, 8]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, plain(input_ids=ids, pixel_values=pixels).logits)


def test_generate_cli_answers_about_an_image_and_a_text_model_refuses_one(tiny_vlm):
    from click.testing import CliRunner

    from tunelab.cli import cli

    image = str(IMAGES / "digits" / "0007.png")
    ok = CliRunner().invoke(cli, ["generate", "--model", str(tiny_vlm), "--image", image, "--prompt", "Which digit?", "--max-new-tokens", "3", "--no-stream"])
    assert ok.exit_code == 0, ok.output
    refused = CliRunner().invoke(cli, ["generate", "--model", "tiny-llama", "--image", image, "--prompt", "Which digit?"])
    assert refused.exit_code == 2 and "reads text only" in refused.output
    missing = CliRunner().invoke(cli, ["generate", "--model", "tiny-llama", "--image", "nope.png", "--prompt", "hi"])
    assert missing.exit_code == 2 and "image not found" in missing.output


def test_batched_evaluation_with_images_answers_as_one_image_at_a_time(tiny_vlm, tmp_path):
    """Left-padded batches of image prompts give each item the answer it gets alone: the images
    reach the right rows and padding does not leak into them."""
    from tunelab.evaluate.pipeline import run_eval
    from tunelab.generate import GenerationSettings, generate

    rows = [json.loads(line) for line in (IMAGES / "test.jsonl").read_text().splitlines()[:6]]
    for row in rows:
        (tmp_path / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(IMAGES / row["image"], tmp_path / row["image"])
    rows[0]["prompt"] = "A much longer question, so that the batch needs left padding: " + rows[0]["prompt"]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = {"data": str(data), "task": "generation", "prompt_template": "{prompt}", "answer_field": "answer", "metrics": ["exact_match"], "max_new_tokens": 4, "batch_size": 3}
    results, _ = run_eval(None, overrides, str(tiny_vlm), [], tmp_path / "eval")
    batched = [r["output"] for r in results[0].records]
    loaded = load_model(str(tiny_vlm))
    alone = [
        generate(loaded.model, loaded.tokenizer, [{"role": "user", "content": row["prompt"]}], GenerationSettings(max_new_tokens=4), images=[str(tmp_path / row["image"])])
        for row in rows
    ]
    assert batched == alone
    assert "exact_match" in results[0].scores


def test_vlm_cli_assembles_a_model_and_refuses_bad_captions_in_one_line(tmp_path):
    from click.testing import CliRunner

    from tunelab.cli import cli

    encoder = tiny_encoder(tmp_path / "encoder")
    made = CliRunner().invoke(cli, ["vlm", "assemble", "--lm", "tiny-llama", "--vision", str(encoder), "--out", str(tmp_path / "vlm"), "--projector", "linear"])
    assert made.exit_code == 0, made.output
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "vlm")
    assert model.config.projector_hidden_act == "linear"
    parts = json.loads((tmp_path / "vlm" / "vlm_parts.json").read_text())
    assert parts["language_model"] == "tiny-llama" and parts["tokens_per_image"] == 16
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": "a.png", "text": "x"}) + "\n")
    refused = CliRunner().invoke(cli, ["vlm", "encoder", "--captions", str(captions), "--out", str(tmp_path / "enc2")])
    assert refused.exit_code == 2 and f"{captions}:1" in refused.output and "image not found" in refused.output
    not_vision = CliRunner().invoke(cli, ["vlm", "assemble", "--lm", "tiny-llama", "--vision", str(tmp_path), "--out", str(tmp_path / "x")])
    assert not_vision.exit_code == 2 and "no config.json" in not_vision.output
