"""The recipe: one pydantic schema that is the single source of truth for a run.

A recipe is YAML on disk plus dotted overrides from the command line (``train.lr=3e-4``).
Every error a user can make here is turned into one line that names the file, the line, the key
path and the offending value, with a "did you mean" suggestion for misspelt keys.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from tunelab.compress.config import CompressConfig
from tunelab.config_base import Section
from tunelab.data.config import DataConfig
from tunelab.errors import UserError
from tunelab.userfiles import read_user_text
from tunelab.evaluate.config import EvalConfig
from tunelab.methods.config import MethodConfig
from tunelab.models.config import ModelConfig
from tunelab.train.config import TrainConfig


class Recipe(Section):
    """Everything one run can say: model, data, method, training, evaluation, compression."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    output_dir: str = Field("runs/{name}", description="Run directory; {name} is the recipe file's stem.")
    seed: int = 0


def json_schema() -> dict[str, Any]:
    """The recipe's JSON Schema (what ``tunelab recipe schema`` prints)."""
    return Recipe.model_json_schema()


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (or start from defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    source = "recipe"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw, lines = _read_yaml(path)
    for override in overrides:
        key_path, value = parse_override(override)
        _set_dotted(raw, key_path, value, override)
        lines[tuple(key_path)] = 0  # 0 marks "came from the command line"
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise _user_error(exc, source, lines) from None
    if path is not None and "{name}" in recipe.output_dir:
        recipe.output_dir = recipe.output_dir.replace("{name}", Path(path).stem)
    elif "{name}" in recipe.output_dir:
        recipe.output_dir = recipe.output_dir.replace("{name}", "run")
    if path is not None:
        _resolve_relative_paths(recipe, Path(path).parent)
    return recipe


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    text = read_user_text(path, "recipe file")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"YAML syntax error: {problem}", where=where, hint="fix the indentation or quoting there") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UserError("a recipe must be a mapping of sections (model:, data:, method:, train:, ...)", where=str(path))
    lines: dict[tuple[str, ...], int] = {}
    _index_lines(node, (), lines)
    return data, lines


def _index_lines(node: yaml.Node | None, prefix: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    """Record the 1-based line of every mapping key, so errors can point at it."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            out[key] = key_node.start_mark.line + 1
            _index_lines(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = (*prefix, str(i))
            out[key] = item.start_mark.line + 1
            _index_lines(item, key, out)


def _resolve_relative_paths(recipe: Recipe, base: Path) -> None:
    """Data paths in a recipe are relative to the recipe file unless they exist from the CWD."""
    data_sections = [recipe.data, *(task.data for task in (recipe.method.tasks or {}).values())]
    fields = [(section, name) for section in data_sections for name in ("train", "validation")]
    fields += [(recipe.compress, "heldout"), (recipe.compress, "calibration"), (recipe.eval, "data"), (recipe.eval, "pool")]
    for section, name in fields:
        value = getattr(section, name)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (base / value).exists():
            setattr(section, name, str(base / value))


# ---------------------------------------------------------------------------------------------
# Overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-4`` -> (["train", "lr"], 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise UserError(f"bad override {text!r}", hint="write KEY.PATH=VALUE, e.g. train.lr=3e-4")
    key, _, value_text = text.partition("=")
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise UserError(f"bad override {text!r}: empty key", hint="write KEY.PATH=VALUE, e.g. method.lora.r=8")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    return [p.strip() for p in parts], value


def _set_dotted(raw: dict[str, Any], parts: list[str], value: Any, original: str) -> None:
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {original!r}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# Error messages


def _user_error(exc: ValidationError, source: str, lines: dict[tuple[str, ...], int]) -> UserError:
    """Turn pydantic's first error into one line: where, which key, what value, what to do."""
    err = exc.errors()[0]
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc) or "(top level)"
    line = _nearest_line(loc, lines)
    where = source if line is None else ("command line" if line == 0 else f"{source}:{line}")
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        parent_fields = _fields_at(Recipe, loc[:-1])
        guess = difflib.get_close_matches(loc[-1], parent_fields, n=1, cutoff=0.5)
        hint = f"did you mean '{'.'.join((*loc[:-1], guess[0]))}'?" if guess else None
        if not hint and parent_fields:
            hint = "known keys: " + ", ".join(parent_fields)
        return UserError(f"unknown key '{dotted}'{more}", where=where, hint=hint)
    value = err.get("input")
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return UserError(f"'{dotted}' = {shown}: {err['msg']}{more}", where=where)


def _nearest_line(loc: tuple[str, ...], lines: dict[tuple[str, ...], int]) -> int | None:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _fields_at(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """Field names of the (nested) model reached by following ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        current = _model_in(current)
        if current is None or part not in current.model_fields:
            return []
        current = current.model_fields[part].annotation
    current = _model_in(current)
    return list(current.model_fields) if current is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside ``X``, ``X | None``, ``Optional[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------------------------------------
# Writing


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (defaults included), as written into each run directory."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
