"""``tunelab serve``: the OpenAI-compatible fine-tuning and inference service."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from tunelab.errors import UserError


def read_api_keys(path: Path) -> dict[str, str]:
    """``KEY [OWNER]`` per line (``#`` comments); a key without an owner owns its own records."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"cannot read the API keys file: {exc.strerror}", where=str(path)) from None
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            raise UserError("expected `KEY [OWNER]`", where=f"{path}:{number}")
        keys[fields[0]] = fields[1] if len(fields) == 2 else f"key{len(keys) + 1}"
    if not keys:
        raise UserError("the API keys file names no key", where=str(path), hint="one `KEY [OWNER]` per line")
    return keys


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (the default is reachable from this machine only).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--data-dir", default="tunelab-serve", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where uploaded files, run directories and the SQLite database live.")
@click.option("--api-key", envvar="TUNELAB_API_KEY", default=None, help="Require this key (Authorization: Bearer KEY). Also TUNELAB_API_KEY.")
@click.option("--api-keys-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="One `KEY [OWNER]` per line; each owner sees only its own files, jobs and models.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Fine-tuning jobs trained at once (the cores are divided between them).")
@click.option("--model", "extra_models", multiple=True, help="A model directory or .gguf file to offer as a base model (repeatable).")
@click.option("--max-upload-mb", default=512, show_default=True, type=click.IntRange(1))
def serve(host: str, port: int, data_dir: Path, api_key: str | None, api_keys_file: Path | None, workers: int,
          extra_models: tuple[str, ...], max_upload_mb: int) -> None:
    """Serve OpenAI's files, fine-tuning jobs, models, chat/completions and embeddings API over
    local training: point the `openai` client's base_url at http://HOST:PORT/v1.

    Jobs train LoRA adapters through the same pipeline as `tunelab train`: method supervised (chat
    or prompt/completion rows) or dpo (OpenAI's preference rows; beta), "auto" hyperparameters by
    tunelab's rule (docs/serve.md). Each job's run directory is DATA_DIR/runs/<job id>, and
    `tunelab eval --run` works on it. The fine-tuned model is
    servable as soon as the job succeeds, under the name the job reports (ft:BASE:tunelab:SUFFIX:ID).
    """
    import uvicorn

    from tunelab.serve.app import create_app
    from tunelab.serve.context import ServeSettings

    keys = read_api_keys(api_keys_file) if api_keys_file else {}
    if api_key:
        keys[api_key] = "default"
    if not keys and host not in ("127.0.0.1", "localhost", "::1"):
        raise UserError(f"refusing to serve on {host} without an API key", where="--host", hint="pass --api-key or --api-keys-file")
    settings = ServeSettings(data_dir=data_dir.resolve(), api_keys=keys, max_upload_bytes=max_upload_mb * 2**20, workers=workers,
                             extra_models=extra_models)
    click.echo(f"tunelab serve: http://{host}:{port}/v1 (data in {settings.data_dir}; {'API keys required' if keys else 'no API key'})", err=True)
    app = create_app(settings)
    access = logging.getLogger("tunelab.serve.access")  # one JSON object per request, on stderr
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)


commands = [serve]
