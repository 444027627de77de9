"""Images in rows: where they are referenced, how they are found, and how they are read.

Two ways to put an image in a row, both common in the wild:

- OpenAI's content parts: a message's ``content`` is a list of ``{"type": "text", "text": ...}``
  and ``{"type": "image_url", "image_url": {"url": ...}}`` parts (the Responses API's
  ``{"type": "input_image", "image_url": ...}`` is read the same way); the image sits where its
  part is.
- A shorthand: ``"image": ref`` (or ``"images": [ref, ...]``) beside ``messages``, ``prompt`` or
  ``text``; the images go before the first user turn (or the text).

A reference is a local path (relative paths are relative to the data file, so a dataset folder
can move), a ``file://`` URL or a ``data:image/...;base64,`` URL. Remote URLs are refused: a
training run must not depend on the network. In the record, each image's place is marked by
``IMAGE_MARKER``; the encoder swaps it for the model's own placeholder token.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from tunelab.errors import UserError

IMAGE_MARKER = "<image>"
SHORTHAND_FIELDS = ("image", "images")
IMAGE_PART_TYPES = ("image_url", "input_image", "image")


def data_file(where: str) -> Path:
    """The file a row came from: every reader names rows ``FILE:LINE`` (or ``FILE:row N``)."""
    return Path(where.rsplit(":", 1)[0])


def resolve_reference(ref: Any, where: str) -> str:
    """A data URL as is, or an absolute path to an existing file; a one-line error otherwise."""
    if not isinstance(ref, str) or not ref:
        raise UserError(f"an image reference must be a non-empty string, got {str(ref)[:40]!r}", where=where)
    if ref.startswith("data:"):
        return ref
    if ref.startswith(("http://", "https://")):
        raise UserError(f"remote image {ref[:60]!r}: tunelab reads local files and data URLs only", where=where, hint="download the images and reference them by path")
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.is_absolute():
        path = data_file(where).parent / path
    if not path.is_file():
        raise UserError(f"image not found: {ref}", where=where, hint=f"paths are relative to the data file's folder ({data_file(where).parent})")
    return str(path.resolve())


def load_image(ref: str, where: str) -> Image.Image:
    """The image as RGB (transparent areas composed onto white, as viewers show them)."""
    try:
        if ref.startswith("data:"):
            header, _, payload = ref.partition(",")
            if ";base64" not in header:
                raise UserError("a data URL image must be base64 encoded (data:image/png;base64,...)", where=where)
            source: Any = io.BytesIO(base64.b64decode(payload, validate=True))
        else:
            source = ref
        image = Image.open(source)
        image.load()
    except (UnidentifiedImageError, binascii.Error, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {ref[:60]!r} ({type(exc).__name__})", where=where, hint="use a PNG, JPEG, GIF or WebP file") from None
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, "white")
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def content_text(content: Any, where: str, n: int) -> tuple[str, list[str]]:
    """A message's content as text with ``IMAGE_MARKER`` where each image part was, and the
    images' resolved references; plain string content passes through."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise UserError(f"message {n} needs a string 'content' or a list of content parts", where=where)
    pieces: list[str] = []
    images: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text") and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in IMAGE_PART_TYPES:
            url = part.get(kind) if kind != "input_image" else part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(resolve_reference(url, where))
            pieces.append(IMAGE_MARKER)
        else:
            raise UserError(
                f"message {n} has a content part tunelab does not read: {str(part)[:60]}", where=where,
                hint='parts are {"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": PATH_OR_DATA_URL}}',
            )
    return "\n".join(pieces), images


def shorthand_images(fields: Mapping[str, Any], where: str) -> list[str]:
    """The row's ``image``/``images`` references, resolved (empty when it has none)."""
    value = fields.get("image", fields.get("images"))
    if value is None:
        return []
    refs = value if isinstance(value, list) else [value]
    return [resolve_reference(ref, where) for ref in refs]


def with_leading_images(text: str, count: int) -> str:
    """``text`` with ``count`` image markers before it (the shorthand's images come first)."""
    return "".join(f"{IMAGE_MARKER}\n" for _ in range(count)) + text
