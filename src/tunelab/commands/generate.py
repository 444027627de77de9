"""``tunelab generate`` and ``tunelab chat``: talk to a packaged, saved or fine-tuned model."""

from __future__ import annotations

import sys

import click

_model_option = click.option(
    "--model", "-m", "model_name", default="smollm2-135m", show_default=True,
    help="Alias (see `tunelab models`), Hugging Face directory, .gguf file or run directory.",
)
_decoding_options = [
    click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1)),
    click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0 = greedy."),
    click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1)),
    click.option("--top-k", default=0, show_default=True, type=click.IntRange(0)),
    click.option("--seed", default=0, show_default=True, type=int),
    click.option("--system", default=None, help="System prompt."),
    click.option("--no-chat-template", is_flag=True, help="Feed the raw prompt even if the model has a chat template."),
]


def _with_decoding(fn):  # type: ignore[no-untyped-def]
    for option in reversed(_decoding_options):
        fn = option(fn)
    return fn


def _load(model_name: str):  # type: ignore[no-untyped-def]
    from tunelab.hardware import configure_threads
    from tunelab.models import load_model

    configure_threads()
    return load_model(model_name, "causal-lm")


@click.command("generate")
@_model_option
@click.option("--prompt", "-p", required=True, help="The user message.")
@_with_decoding
@click.option("--stream/--no-stream", default=True, show_default=True, help="Print tokens as they are generated.")
@click.option("--image", "images", multiple=True, help="An image (path or data URL) the prompt is about; repeat for several. Needs a vision-language model.")
def generate_command(model_name: str, prompt: str, stream: bool, system: str | None, no_chat_template: bool, images: tuple[str, ...], **decoding: float) -> None:
    """Generate a reply to one prompt (about one or more images, for a vision-language model)."""
    from tunelab.data.images import resolve_reference
    from tunelab.generate import GenerationSettings, generate

    refs = [resolve_reference(ref, "--image") for ref in images]  # before the slow model load
    loaded = _load(model_name)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    settings = GenerationSettings(**decoding)  # type: ignore[arg-type]
    on_text = (lambda piece: (sys.stdout.write(piece), sys.stdout.flush())) if stream else None
    text = generate(loaded.model, loaded.tokenizer, messages, settings, use_chat_template=not no_chat_template, on_text=on_text, images=refs)
    click.echo("" if stream else text)


@click.command("chat")
@_model_option
@_with_decoding
def chat_command(model_name: str, system: str | None, no_chat_template: bool, **decoding: float) -> None:
    """Interactive chat, streaming tokens to the terminal (Ctrl-D or /exit to quit, /reset to clear)."""
    from tunelab.generate import GenerationSettings, generate

    loaded = _load(model_name)
    settings = GenerationSettings(**decoding)  # type: ignore[arg-type]
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    click.echo(f"chatting with {loaded.source} — /reset clears the conversation, /exit quits")
    while True:
        try:
            user = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if user in {"/exit", "/quit"}:
            return
        if user == "/reset":
            history = history[:1] if system else []
            continue
        if not user:
            continue
        history.append({"role": "user", "content": user})
        sys.stdout.write("model> ")
        reply = generate(
            loaded.model, loaded.tokenizer, history, settings,
            use_chat_template=not no_chat_template,
            on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()),
        )
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})


commands = [generate_command, chat_command]
