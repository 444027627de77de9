"""``tunelab vlm``: build a LLaVA-style vision-language model from parts tunelab can get offline.

``vlm encoder`` pretrains a small CLIP vision tower contrastively on captioned images (against a
frozen sentence encoder); ``vlm assemble`` joins a vision tower and a causal LM with a fresh
projector into a ``LlavaForConditionalGeneration`` folder that ``tunelab train`` (method.vision)
fine-tunes and ``tunelab generate --image`` runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("vlm")
def vlm_group() -> None:
    """Build a vision-language model: pretrain a vision encoder, assemble it with a language model."""


@vlm_group.command("encoder")
@click.option("--captions", required=True, type=click.Path(dir_okay=False), help='JSONL rows {"image": PATH, "text": CAPTION} (paths relative to the file).')
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the vision encoder (a CLIP vision model and its image processor).")
@click.option("--text-model", default="minilm-l6", show_default=True, help="The frozen sentence encoder the image embeddings learn to match.")
@click.option("--image-size", default=32, show_default=True, type=click.IntRange(8))
@click.option("--patch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--hidden", default=192, show_default=True, type=click.IntRange(8))
@click.option("--layers", default=4, show_default=True, type=click.IntRange(1))
@click.option("--heads", default=3, show_default=True, type=click.IntRange(1))
@click.option("--steps", default=300, show_default=True, type=click.IntRange(1))
@click.option("--batch", default=64, show_default=True, type=click.IntRange(2))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int)
def encoder_command(captions: str, out: str, text_model: str, **settings: float) -> None:
    """Pretrain a CLIP vision tower on captioned images against a frozen text encoder."""
    from tunelab.hardware import configure_threads
    from tunelab.train.vision_encoder import (
        VisionEncoderSettings,
        pretrain_vision_encoder,
    )

    configure_threads()
    report = pretrain_vision_encoder(Path(captions), Path(out), VisionEncoderSettings(**settings), text_model=text_model)  # type: ignore[arg-type]
    click.echo(json.dumps({k: report[k] for k in ("retrieval_before", "retrieval_after", "seconds") if k in report}))


@vlm_group.command("assemble")
@click.option("--lm", "lm_name", default="smollm2-135m", show_default=True, help="The language model: an alias, a GGUF file or a Hugging Face folder.")
@click.option("--vision", "vision_dir", required=True, type=click.Path(file_okay=False, exists=True), help="A vision encoder folder (from `tunelab vlm encoder`, or a CLIP/SigLIP vision model).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the assembled LlavaForConditionalGeneration.")
@click.option("--projector", type=click.Choice(["mlp", "linear"]), default="mlp", show_default=True, help="2-layer GELU MLP (LLaVA-1.5) or linear (LLaVA-1).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the projector's initial weights.")
def assemble_command(lm_name: str, vision_dir: str, out: str, projector: str, seed: int) -> None:
    """Join a vision encoder and a language model with a fresh projector (train it with method.vision)."""
    from tunelab.models import load_model
    from tunelab.models.vlm_assemble import assemble_vlm

    loaded = load_model(lm_name, "causal-lm")
    sources = {"language_model": lm_name, "vision_encoder": str(Path(vision_dir).resolve())}
    folder = assemble_vlm(loaded.model, loaded.tokenizer, Path(vision_dir), Path(out), projector=projector, seed=seed, sources=sources)  # type: ignore[arg-type]
    click.echo(f"assembled {folder}: train the projector with `method: {{vision: {{train: [projector]}}}}`")


commands = [vlm_group]
