"""A CLIP vision tower pretrained against frozen MiniLM learns, saves as plain transformers, and
keeps its validation images out of training."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import pytest
import torch
from PIL import Image

from tunelab.errors import UserError
from tunelab.train.vision_encoder import VisionEncoderSettings, pretrain_vision_encoder

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TINY = VisionEncoderSettings(hidden=32, layers=2, heads=2, intermediate=64, steps=60, batch=16, lr=3e-3,
                             warmup=6, validation_fraction=0.2, log_every=10)


def write_digits(folder, n=40):
    """Real handwritten digits (sklearn's 8x8 set) as 32x32 RGB PNGs with captions by digit word."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = []
    for i in range(n):
        ink = (255 - digits.images[i] * 255 / 16).astype("uint8")
        Image.fromarray(ink).resize((32, 32), Image.BILINEAR).convert("RGB").save(folder / f"{i:03d}.png")
        rows.append({"image": f"{i:03d}.png", "text": f"a handwritten digit {WORDS[digits.target[i]]}"})
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    captions = write_digits(folder)
    report = pretrain_vision_encoder(captions, folder / "out", TINY, progress=None)
    return captions, folder / "out", report


def test_loss_falls_and_retrieval_is_reported(trained):
    _, out, report = trained
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 7  # step 1, then every 10 steps
    assert losses[-1] < losses[0], losses
    assert (out / "loss_curve.png").stat().st_size > 0
    for key in ("retrieval_before", "retrieval_after"):
        assert 0 <= report[key]["top1"] <= report[key]["top5"] <= 1
    assert report["steps"] == 60 and report["text_dim"] == 384
    assert json.loads((out / "report.json").read_text())["retrieval_after"] == report["retrieval_after"]


def test_validation_images_are_disjoint_from_training(trained):
    captions, out, report = trained
    split = json.loads((out / "split.json").read_text())
    everything = {json.loads(line)["image"] for line in captions.read_text().splitlines()}
    assert not set(split["train"]) & set(split["validation"])
    assert set(split["train"]) | set(split["validation"]) == everything
    assert (report["train_images"], report["validation_images"]) == (32, 8)
    assert report["retrieval_after"]["images"] == 8


def test_saved_folder_reloads_with_plain_transformers(trained):
    from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

    captions, out, report = trained
    model = CLIPVisionModelWithProjection.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    image = Image.open(captions.parent / report["probe"]["image"])
    with torch.no_grad():
        embedding = model(**processor(images=image, return_tensors="pt")).image_embeds[0]
    expected = torch.tensor(report["probe"]["embedding"])
    torch.testing.assert_close(torch.nn.functional.normalize(embedding, dim=-1), expected, atol=1e-5, rtol=1e-4)
    assert processor.crop_size == {"height": 32, "width": 32}
    assert not any(name.startswith(".") for name in os.listdir(out.parent))  # no temporary left behind


def test_missing_image_names_file_and_line(tmp_path):
    captions = write_digits(tmp_path, n=3)
    captions.write_text(captions.read_text() + json.dumps({"image": "gone.png", "text": "a digit"}) + "\n")
    with pytest.raises(UserError, match=r"captions\.jsonl:4"):
        pretrain_vision_encoder(captions, tmp_path / "out", TINY, progress=None)
    assert not (tmp_path / "out").exists()
