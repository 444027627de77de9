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
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
)

from tunelab import plugins
from tunelab.compress.config import CompressConfig
from tunelab.config_base import Section
from tunelab.data.config import DataConfig
from tunelab.errors import UserError
from tunelab.evaluate.config import EvalConfig
from tunelab.methods import METHODS
from tunelab.methods.config import MethodConfig, TaskConfig
from tunelab.models.config import ModelConfig
from tunelab.train import (  # noqa: F401  (register the samplers, NEFTune, SWA, EMA and ReLU annealing)
    curriculum,
    importance,
    neftune,
    relu_annealing,
    task_mix,
    weight_average,
)
from tunelab.train.callbacks import CALLBACKS
from tunelab.train.config import TrainConfig
from tunelab.train.objectives import OBJECTIVES
from tunelab.train.samplers import SAMPLERS
from tunelab.userfiles import read_user_text


class StageConfig(Section):
    """One stage of a multi-stage recipe: the sections it sets, merged over the recipe's top level
    (mappings key by key, anything else replaced; ``method: {lora: null}`` drops an inherited
    adapter). The stage trains from the previous stage's model (its adapters merged in)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The stage's name: its folder is stages/NN-<name>.")
    data: dict[str, Any] | None = None
    method: dict[str, Any] | None = None
    objective: dict[str, Any] | None = None
    sampler: dict[str, Any] | None = None
    callbacks: list[Any] | None = None
    train: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    compress: dict[str, Any] | None = None


class Recipe(Section):
    """Everything one run can say: model, data, method, objective, data order, callbacks, training,
    evaluation, compression. ``recipe_class()`` extends it with every registered plug-in's section."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    objective: Any = Field(None, description="The loss: {name: <objective>, ...its settings}; default: derived from the head (or causal LM).")
    sampler: Any = Field(None, description="Data order: {name: <sampler>, ...its settings}; default: shuffle every epoch.")
    callbacks: list[Any] = Field(default_factory=list, description="Extra registered callbacks: [{name: <callback>, ...its settings}].")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    output_dir: str | None = Field(
        None, description="Run directory ({name} is the recipe's name); default: a new runs/<name>-<time>-<random> per run."
    )
    seed: int = 0
    stages: list[StageConfig] | None = Field(
        None, description="An ordered list of stages, each trained from the previous one's model, in one run directory (stages/NN-<name>/)."
    )
    #: The recipe file's stem ("run" for a recipe built from a dict): names the default run directory.
    _name: str = PrivateAttr("run")
    #: With ``stages``: each stage's complete recipe (the top level with the stage merged over it).
    _stage_recipes: list[Recipe] = PrivateAttr(default_factory=list)

    @property
    def name(self) -> str:
        return self._name

    @property
    def stage_recipes(self) -> list[Recipe]:
        """Each stage's own recipe, validated when the recipe was loaded (empty without ``stages``)."""
        return self._stage_recipes


_built: tuple[int, type[Recipe]] | None = None


def _named(name: str, config: type[BaseModel]) -> type[BaseModel]:
    """``config`` with a ``name: Literal[name]`` key, so a choice section is validated by its name."""
    return create_model(f"{config.__name__}_{name}", __base__=config, __doc__=config.__doc__, name=(Literal[name], name))


def _choice(registry: plugins.Registry[Any]) -> Any:
    """A section choosing one registered plug-in by ``name`` and holding that plug-in's own settings."""
    options = [_named(name, entry.Config) for name, entry in registry.items() if getattr(entry, "Config", None) is not None]
    if not options:
        return Annotated[Any, BeforeValidator(_nothing_registered(registry.kind))]
    return options[0] if len(options) == 1 else Annotated[Union[tuple(options)], Field(discriminator="name")]


def _nothing_registered(kind: str) -> Any:
    def reject(value: Any) -> Any:
        raise ValueError(f"no {kind} that takes settings is registered")

    return reject


def recipe_class() -> type[Recipe]:
    """The recipe schema with every plug-in registered so far (rebuilt when a registry changes)."""
    global _built
    if _built is not None and _built[0] == plugins.version():
        return _built[1]
    objective, sampler, callback = _choice(OBJECTIVES), _choice(SAMPLERS), _choice(CALLBACKS)
    task = create_model("TaskConfig", __base__=TaskConfig, __doc__=TaskConfig.__doc__, objective=(objective | None, Field(None, description=TaskConfig.model_fields["objective"].description)))
    extra: dict[str, Any] = {key: (METHODS.get(key).Config | None, None) for key in METHODS if key not in MethodConfig.model_fields}
    extra["tasks"] = (dict[str, task] | None, Field(None, description=MethodConfig.model_fields["tasks"].description))
    method = create_model("MethodConfig", __base__=MethodConfig, __doc__=MethodConfig.__doc__, **extra)
    cls = create_model(
        "Recipe", __base__=Recipe, __doc__=Recipe.__doc__,
        method=(method, Field(default_factory=method)),
        objective=(objective | None, Field(None, description=Recipe.model_fields["objective"].description)),
        sampler=(sampler | None, Field(None, description=Recipe.model_fields["sampler"].description)),
        callbacks=(list[callback], Field(default_factory=list, description=Recipe.model_fields["callbacks"].description)),
    )
    _built = (plugins.version(), cls)
    return cls


def json_schema() -> dict[str, Any]:
    """The recipe's JSON Schema (what ``tunelab recipe schema`` prints), plug-ins included."""
    return recipe_class().model_json_schema()


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (or start from defaults when ``path`` is None) and apply overrides."""
    if path is None:
        return recipe_from_dict({}, overrides=overrides)
    path = Path(path)
    raw, lines = _read_yaml(path)
    return _validated(raw, lines, str(path), overrides, base=path.parent, name=path.stem)


def recipe_from_dict(
    data: dict[str, Any], *, base: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), name: str = "run"
) -> Recipe:
    """A recipe from a mapping (JSON from a program or the service), with the same checks and
    messages as a file (key paths instead of lines); relative data paths resolve against ``base``
    (default: the current directory), as a file's resolve against its folder."""
    if not isinstance(data, dict):
        raise UserError("a recipe must be a mapping of sections (model:, data:, method:, train:, ...)", where="recipe")
    return _validated(json.loads(json.dumps(data)), {}, "recipe", overrides, base=Path(base) if base else None, name=name)


def _validated(
    raw: dict[str, Any], lines: dict[tuple[str, ...], int], source: str, overrides: list[str] | tuple[str, ...], *, base: Path | None, name: str
) -> Recipe:
    for override in overrides:
        key_path, value = parse_override(override)
        _set_dotted(raw, key_path, value, override)
        lines[tuple(key_path)] = 0  # 0 marks "came from the command line"
        for n in range(1, len(key_path)):  # a section only the override names is the command line's too
            lines.setdefault(tuple(key_path[:n]), 0)
    cls = recipe_class()
    try:
        recipe = cls.model_validate(raw)
    except ValidationError as exc:
        raise _user_error(exc, source, lines, cls) from None
    recipe._name = name
    if recipe.output_dir and "{name}" in recipe.output_dir:
        recipe.output_dir = recipe.output_dir.replace("{name}", name)
    if base is not None:
        _resolve_relative_paths(recipe, base)
    if recipe.stages:
        recipe._stage_recipes = _stage_recipes(raw, recipe.stages, lines, source, cls, base=base, name=name)
    return recipe


def _stage_recipes(
    raw: dict[str, Any], specs: list[StageConfig], lines: dict[tuple[str, ...], int], source: str, cls: type[Recipe], *, base: Path | None, name: str
) -> list[Recipe]:
    """Each stage merged over the top level and validated as a whole recipe; an error names the
    stage's own key (``stages.1.train.lr``) when the stage set it."""
    top = {key: value for key, value in raw.items() if key != "stages"}
    seen: dict[str, int] = {}
    recipes = []
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise UserError(
                f"stage name '{spec.name}' is used twice (stages {seen[spec.name]} and {i})",
                where=_where(source, lines, ("stages", str(i), "name")), hint="give every stage its own name",
            )
        seen[spec.name] = i
        sections = {key: getattr(spec, key) for key in StageConfig.model_fields if key != "name" and getattr(spec, key) is not None}
        merged = _deep_merged(top, sections)
        try:
            recipe = cls.model_validate(merged)
        except ValidationError as exc:
            loc = tuple(str(p) for p in exc.errors()[0]["loc"])
            prefix = ("stages", str(i)) if _sets(sections, loc) else ()
            raise _user_error(exc, source, lines, cls, prefix=prefix) from None
        recipe._name = f"{name}-{spec.name}"
        if base is not None:
            _write_back(sections, _resolve_relative_paths(recipe, base))
        recipes.append(recipe)
    return recipes


def _deep_merged(top: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``top`` with ``over`` laid on it: mappings merge key by key, anything else is replaced."""
    merged = dict(top)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _sets(sections: dict[str, Any], loc: tuple[str, ...]) -> bool:
    """True when ``sections`` holds the first key of ``loc`` and, through mappings, as much of
    the rest of it as exists: the stage, not the top level, wrote the offending value."""
    node: Any = sections
    for part in loc:
        if not isinstance(node, dict):
            return True
        if part not in node:
            return node is not sections
        node = node[part]
    return True


def _where(source: str, lines: dict[tuple[str, ...], int], loc: tuple[str, ...]) -> str:
    line = _nearest_line(loc, lines)
    return source if line is None else ("command line" if line == 0 else f"{source}:{line}")


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


def _resolve_relative_paths(recipe: Recipe, base: Path) -> dict[tuple[str, ...], str]:
    """Data paths in a recipe are relative to the recipe file unless they exist from the CWD;
    returns the key paths it changed, with their new values."""
    data_sections = [(("data",), recipe.data), *((("method", "tasks", name, "data"), task.data) for name, task in (recipe.method.tasks or {}).items())]
    fields = [(at, section, name) for at, section in data_sections for name in ("train", "validation")]
    fields += [((*at, "mixture", str(i)), source, "train") for at, section in data_sections for i, source in enumerate(section.mixture or [])]
    fields += [(("compress",), recipe.compress, "heldout"), (("compress",), recipe.compress, "calibration"), (("eval",), recipe.eval, "data"), (("eval",), recipe.eval, "pool")]
    if recipe.method.student is not None:
        fields.append((("method", "student"), recipe.method.student, "calibration"))
    changed = {}
    for at, section, name in fields:
        value = getattr(section, name)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (base / value).exists():
            setattr(section, name, str(base / value))
            changed[(*at, name)] = str(base / value)
    return changed


def _write_back(sections: dict[str, Any], changed: dict[tuple[str, ...], str]) -> None:
    """Put the resolved paths into a stage's own sections where the stage set them, so the
    recipe written into the run directory reads the same files from there."""
    for path, value in changed.items():
        node: Any = sections
        for part in path[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            node[path[-1]] = value


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


def _user_error(
    exc: ValidationError, source: str, lines: dict[tuple[str, ...], int], schema: type[BaseModel], prefix: tuple[str, ...] = ()
) -> UserError:
    """Turn pydantic's first error into one line: where, which key, what value, what to do.
    ``prefix`` is where the validated mapping sits in the file (a stage: ``("stages", "1")``)."""
    err = exc.errors()[0]
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join((*prefix, *loc)) or "(top level)"
    where = _where(source, lines, (*prefix, *loc))
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        parent_fields = _fields_at(schema, loc[:-1])
        guess = difflib.get_close_matches(loc[-1], parent_fields, n=1, cutoff=0.5)
        hint = f"did you mean '{'.'.join((*prefix, *loc[:-1], guess[0]))}'?" if guess else None
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
    """The fully resolved recipe as YAML (defaults included), as written into each run directory;
    stages keep only the sections they set (the rest comes from the top level)."""
    data = recipe.model_dump(mode="json")
    if data.get("stages"):
        data["stages"] = [{key: value for key, value in stage.items() if value is not None} for stage in data["stages"]]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def copy_recipe(recipe: Recipe, **changes: Any) -> Recipe:
    """A copy of ``recipe`` with top-level fields changed (keeps its name)."""
    copied = recipe.model_copy(update=changes)
    copied._name = recipe.name
    return copied
