"""The recipe schema: defaults, overrides, and one-line errors that point at the mistake."""

import json

import pytest

from tunelab.errors import UserError
from tunelab.recipe import dump_recipe, json_schema, load_recipe, parse_override


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_output_dir_from_file_name(tmp_path):
    recipe = load_recipe(write(tmp_path, "train:\n  lr: 1e-3\n", "sentiment.yaml"))
    assert recipe.train.lr == 1e-3
    assert recipe.model.name == "smollm2-135m"
    assert recipe.output_dir is None and recipe.name == "sentiment"  # each run gets runs/sentiment-<time>-<random>
    assert load_recipe(write(tmp_path, "output_dir: runs/{name}\n", "named.yaml")).output_dir == "runs/named"


def test_dotted_overrides_are_parsed_as_yaml_values(tmp_path):
    recipe = load_recipe(write(tmp_path, "train:\n  lr: 1e-3\n"), ["train.lr=3e-4", "train.batch_size=8", "data.columns={q: prompt}"])
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.train.batch_size == 8
    assert recipe.data.columns == {"q": "prompt"}
    assert parse_override("model.name=tiny-llama") == (["model", "name"], "tiny-llama")


def test_unknown_key_suggests_the_right_one_with_line(tmp_path):
    path = write(tmp_path, "model:\n  name: tiny-llama\ntrain:\n  lr: 0.1\n  bacth_size: 4\n")
    with pytest.raises(UserError) as err:
        load_recipe(path)
    line = err.value.one_line()
    assert f"{path}:5" in line and "train.bacth_size" in line and "did you mean 'train.batch_size'" in line


def test_unknown_section_lists_known_keys(tmp_path):
    with pytest.raises(UserError, match="unknown key 'trian'.*did you mean 'train'"):
        load_recipe(write(tmp_path, "trian:\n  lr: 1\n"))


def test_type_error_names_key_path_and_value(tmp_path):
    path = write(tmp_path, "train:\n  lr: fast\n")
    with pytest.raises(UserError) as err:
        load_recipe(path)
    line = err.value.one_line()
    assert f"{path}:2" in line and "'train.lr' = \"fast\"" in line and "\n" not in line


def test_bad_override_value_says_command_line(tmp_path):
    with pytest.raises(UserError, match="command line.*'train.batch_size' = -1"):
        load_recipe(write(tmp_path, ""), ["train.batch_size=-1"])
    with pytest.raises(UserError, match="KEY.PATH=VALUE"):
        load_recipe(None, ["train.lr"])


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: [1, 2\nmodel: x\n")
    with pytest.raises(UserError, match=rf"{path}:\d+: YAML syntax error"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_dump_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, "seed: 7\n"), ["train.lr=0.01"])
    again = load_recipe(write(tmp_path, dump_recipe(recipe), "again.yaml"))
    assert again.model_dump() == recipe.model_dump()


def test_json_schema_covers_every_section():
    schema = json_schema()
    assert {"model", "data", "method", "train", "eval", "compress", "output_dir", "seed"} <= set(schema["properties"])
    json.dumps(schema)


def test_an_unknown_section_from_the_command_line_is_blamed_on_the_command_line(tmp_path):
    with pytest.raises(UserError, match=r"^command line: unknown key 'foo'"):
        load_recipe(write(tmp_path, "train:\n  lr: 1e-3\n"), ["foo.bar=3"])
