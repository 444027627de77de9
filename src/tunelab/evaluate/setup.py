"""Resolve an evaluation from a recipe's ``eval:`` section, its ``data:`` defaults and CLI options.

Command-line options win over the recipe; an unset ``eval`` field falls back to the matching
``data`` field (validation file, train file as the few-shot pool, prompt template, system prompt,
chat template), so a recipe states its prompt once for training and evaluation alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tunelab.errors import UserError
from tunelab.evaluate.config import EvalConfig
from tunelab.evaluate.runner import EvalSetup
from tunelab.recipe import Recipe


def resolve_setup(recipe: Recipe | None, overrides: dict[str, Any], recipe_dir: str | Path | None = None) -> EvalSetup:
    """An ``EvalSetup`` from ``recipe`` (may be None) with ``overrides`` (None values ignored).

    A recipe's relative ``eval.data`` / ``eval.pool`` are found next to the recipe file
    (``recipe_dir``) when they do not exist from the working directory, like ``data.train``.
    """
    base = recipe.eval.model_dump() if recipe else {}
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        cfg = EvalConfig.model_validate({**base, **given})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "eval"
        raise UserError(f"eval.{where}: {err['msg']}", hint="check the eval: section or the matching option") from None
    data_cfg = recipe.data if recipe else None
    if data_cfg is not None:
        cfg = cfg.model_copy(
            update={
                "prompt_template": cfg.prompt_template or data_cfg.prompt_template,
                "system_prompt": cfg.system_prompt or data_cfg.system_prompt,
            }
        )
    data = cfg.data or (data_cfg.validation if data_cfg else None)
    if not data:
        raise UserError("no evaluation data", hint="pass --data FILE (or set eval.data / data.validation in the recipe)")
    pool = cfg.pool or (data_cfg.train if data_cfg else None)
    if recipe_dir is not None:
        data, pool = _near(data, Path(recipe_dir)), _near(pool, Path(recipe_dir)) if pool else None
    return EvalSetup(cfg=cfg, data=data, pool=pool, chat_template=data_cfg.template if data_cfg else "auto")


def _near(path: str, base: Path) -> str:
    """``path`` as given if it exists, else relative to ``base`` when it exists there."""
    candidate = base / path
    return str(candidate) if not Path(path).is_absolute() and not Path(path).exists() and candidate.exists() else path
