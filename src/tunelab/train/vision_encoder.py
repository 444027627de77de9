"""Pretrain a small CLIP vision tower against a frozen sentence encoder ("locked text tower").

No installed package ships pretrained vision weights, so a LLaVA-style model needs its vision
encoder trained here. The text side is a packaged sentence encoder (MiniLM) kept frozen: its
caption embeddings are computed once, and only the image tower (plus the learned temperature)
learns to land each image next to its caption. The result saves as a plain
``CLIPVisionModelWithProjection`` and image processor, so transformers reloads it without tunelab.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from tunelab import atomic
from tunelab.data.bad_rows import BadRows
from tunelab.data.images import load_image, resolve_reference
from tunelab.data.readers import read_rows
from tunelab.data.records import string_field
from tunelab.errors import UserError
from tunelab.methods.pooling import pool
from tunelab.report.plots import plot_training


@dataclass
class VisionEncoderSettings:
    """Tower shape and training knobs; the defaults fit 32x32 images and train in minutes on a CPU."""

    image_size: int = 32
    patch_size: int = 8
    hidden: int = 192
    layers: int = 4
    heads: int = 3
    intermediate: int = 768
    steps: int = 300
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 30
    temperature: float = 0.07  # initial; the logit scale 1/T is learned and capped at 100, as in CLIP
    max_logit_scale: float = 100.0
    seed: int = 0
    validation_fraction: float = 0.1
    translate: int = 0  # max random shift in pixels; 0 = off (crops/flips would change digit meaning)
    log_every: int = 10


def read_captions(path: Path) -> list[tuple[str, Image.Image, str]]:
    """(image as the row names it, RGB image, caption) per row of any data file tunelab reads; a
    bad row is a UserError naming file:line."""
    rows = []
    for row in read_rows(path, BadRows("error"), "--captions"):
        ref = resolve_reference(row.fields.get("image"), row.where)
        caption = string_field(row.fields, "text", row.where)
        if not caption.strip():
            raise UserError("empty caption", where=row.where)
        rows.append((row.fields["image"], load_image(ref, row.where), caption))
    if len(rows) < 2:
        raise UserError("need at least two captioned images", where=str(path))
    return rows


def split_images(names: list[str], fraction: float, seed: int) -> set[str]:
    """Validation image names: whole images are held out, so a repeated image never straddles the split."""
    unique = sorted(set(names))
    random.Random(seed).shuffle(unique)
    count = min(len(unique) - 1, round(len(unique) * fraction)) if fraction > 0 else 0
    return set(unique[:count])


def build_processor(images: list[Image.Image], size: int) -> CLIPImageProcessorPil:
    """A CLIP processor normalised with the training images' own per-channel mean and std."""
    common = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}, "do_convert_rgb": True}
    raw = CLIPImageProcessorPil(do_normalize=False, **common)(images=images, return_tensors="pt")["pixel_values"]
    mean, std = raw.mean(dim=(0, 2, 3)), raw.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return CLIPImageProcessorPil(image_mean=mean.tolist(), image_std=std.tolist(), **common)


@torch.no_grad()
def embed_captions(texts: list[str], text_model: str) -> torch.Tensor:
    """Frozen sentence embeddings (mean pooling + L2 norm, as sentence-transformers), computed once."""
    from tunelab.models.load import load_model

    loaded = load_model(text_model, "base")
    loaded.model.eval()
    chunks = []
    for start in range(0, len(texts), 256):
        batch = loaded.tokenizer(texts[start:start + 256], padding=True, truncation=True, return_tensors="pt")
        hidden = loaded.model(**batch).last_hidden_state
        chunks.append(F.normalize(pool(hidden, batch["attention_mask"], "mean"), dim=-1))
    return torch.cat(chunks).float()


def build_tower(settings: VisionEncoderSettings, projection_dim: int) -> CLIPVisionModelWithProjection:
    """A randomly initialised (seeded) CLIP vision tower whose projection matches the text width."""
    config = CLIPVisionConfig(
        hidden_size=settings.hidden, intermediate_size=settings.intermediate, num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads, image_size=settings.image_size, patch_size=settings.patch_size,
        projection_dim=projection_dim, num_channels=3,
    )
    torch.manual_seed(settings.seed)
    return CLIPVisionModelWithProjection(config)


def image_embeddings(model: CLIPVisionModelWithProjection, pixels: torch.Tensor) -> torch.Tensor:
    return F.normalize(model(pixel_values=pixels).image_embeds, dim=-1)


def info_nce(images: torch.Tensor, texts: torch.Tensor, caption_ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; another row with the same caption is masked out rather than counted as a negative."""
    logits = scale * images @ texts.T
    same = caption_ids[:, None] == caption_ids[None, :]
    logits = logits.masked_fill(same & ~torch.eye(len(same), dtype=torch.bool), float("-inf"))
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@torch.no_grad()
def retrieval(model: CLIPVisionModelWithProjection, pixels: torch.Tensor, caption_ids: torch.Tensor,
              text: torch.Tensor) -> dict[str, float | int]:
    """Image->text top-1/top-5 among all unique captions of the held-out images (random-guess floor ~1/candidates)."""
    candidates = caption_ids.unique()
    model.eval()
    scores = torch.cat([image_embeddings(model, chunk) for chunk in pixels.split(256)]) @ text[candidates].T
    model.train()
    ranked = candidates[scores.topk(min(5, len(candidates)), dim=1).indices]
    hits = ranked == caption_ids[:, None]
    return {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(1).float().mean().item(),
            "images": len(caption_ids), "candidates": len(candidates)}


def shift(pixels: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``limit`` pixels (edge-padded): label-preserving, unlike crops or flips."""
    if limit <= 0:
        return pixels
    padded = F.pad(pixels, (limit,) * 4, mode="replicate")
    size = pixels.shape[-1]
    offsets = torch.randint(0, 2 * limit + 1, (len(pixels), 2), generator=generator).tolist()
    return torch.stack([p[:, y:y + size, x:x + size] for p, (y, x) in zip(padded, offsets, strict=True)])


def schedule(settings: VisionEncoderSettings) -> Callable[[int], float]:
    """Linear warmup then cosine decay to zero, as a LambdaLR multiplier."""
    def factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def train_tower(model: CLIPVisionModelWithProjection, pixels: torch.Tensor, text: torch.Tensor,
                caption_ids: torch.Tensor, train_idx: torch.Tensor, settings: VisionEncoderSettings,
                say: Callable[[str], None]) -> tuple[list[dict[str, float]], float]:
    """The training loop; returns the logged metrics (window-mean loss) and the final logit scale."""
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / settings.temperature)))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2] + [logit_scale]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(settings))
    generator = torch.Generator().manual_seed(settings.seed)
    batch, queue = min(settings.batch, len(train_idx)), torch.empty(0, dtype=torch.long)
    metrics: list[dict[str, float]] = []
    window: list[float] = []
    model.train()
    start = time.perf_counter()
    for step in range(1, settings.steps + 1):
        while len(queue) < batch:  # epochs of seeded permutations: every image is seen before any repeats
            queue = torch.cat([queue, train_idx[torch.randperm(len(train_idx), generator=generator)]])
        picked, queue = queue[:batch], queue[batch:]
        embeds = image_embeddings(model, shift(pixels[picked], settings.translate, generator))
        loss = info_nce(embeds, text[caption_ids[picked]], caption_ids[picked], logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            logit_scale.clamp_(0, math.log(settings.max_logit_scale))
        window.append(loss.item())
        if step == 1 or step % settings.log_every == 0 or step == settings.steps:
            elapsed = time.perf_counter() - start
            rate = step * batch / elapsed
            metrics.append({"type": "train", "step": step, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                            "logit_scale": logit_scale.exp().item(), "images_per_second": rate, "seconds": elapsed})
            window = []
            say(f"step {step}/{settings.steps} loss {metrics[-1]['loss']:.4f} {rate:.0f} img/s "
                f"ETA {(settings.steps - step) * batch / rate:.0f}s")
    model.eval()
    return metrics, logit_scale.exp().item()


def pretrain_vision_encoder(captions: Path, out: Path, settings: VisionEncoderSettings | None = None, *,
                            text_model: str = "minilm-l6",
                            progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train a CLIP vision tower on captioned images against a frozen text encoder; save it to ``out``.

    ``out`` appears only when training finished (built in a temporary sibling, then renamed), holding
    the model and processor (``save_pretrained``), ``metrics.jsonl``, ``split.json`` (which images
    trained, which were held out) and ``report.json``. Returns the report.
    """
    settings = settings or VisionEncoderSettings()
    say = progress or (lambda _line: None)
    start = time.perf_counter()
    captions = Path(captions)
    rows = read_captions(captions)
    held_out = split_images([name for name, _, _ in rows], settings.validation_fraction, settings.seed)
    is_val = torch.tensor([name in held_out for name, _, _ in rows])
    train_idx, val_idx = (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1)
    texts = sorted({text for _, _, text in rows})
    index = {t: i for i, t in enumerate(texts)}
    caption_ids = torch.tensor([index[text] for _, _, text in rows])
    processor = build_processor([rows[i][1] for i in train_idx.tolist()], settings.image_size)
    pixels = processor(images=[image for _, image, _ in rows], return_tensors="pt")["pixel_values"]
    text = embed_captions(texts, text_model)
    model = build_tower(settings, text.shape[1])

    def evaluate() -> dict[str, float | int] | None:
        return retrieval(model, pixels[val_idx], caption_ids[val_idx], text) if len(val_idx) else None

    before = evaluate()
    say(f"vision encoder: {len(train_idx)} train / {len(val_idx)} validation images, {len(texts)} captions; "
        f"retrieval before: {before}")
    train_start = time.perf_counter()
    metrics, logit_scale = train_tower(model, pixels, text, caption_ids, train_idx, settings, say)
    train_seconds = time.perf_counter() - train_start
    after = evaluate()
    say(f"retrieval after: {after}")
    probe_idx = int((val_idx if len(val_idx) else train_idx)[0])
    with torch.no_grad():
        probe = image_embeddings(model, pixels[probe_idx:probe_idx + 1])[0]
    report = {
        "settings": asdict(settings), "captions_file": str(captions), "text_model": text_model,
        "text_dim": text.shape[1], "images": len(rows), "train_images": len(train_idx),
        "validation_images": len(val_idx), "unique_captions": len(texts),
        "retrieval_before": before, "retrieval_after": after, "steps": settings.steps,
        "first_loss": metrics[0]["loss"], "final_loss": metrics[-1]["loss"], "logit_scale": logit_scale,
        "threads": torch.get_num_threads(), "train_seconds": train_seconds, "seconds": time.perf_counter() - start,
        "probe": {"image": rows[probe_idx][0], "embedding": probe.tolist()},  # lets a reload be checked exactly
    }
    split = {"train": sorted({rows[i][0] for i in train_idx.tolist()}), "validation": sorted(held_out)}
    with atomic.directory(out) as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        (folder / "split.json").write_text(json.dumps(split, indent=1) + "\n")
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_training(out / "metrics.jsonl", out / "loss_curve.png")
    return report
