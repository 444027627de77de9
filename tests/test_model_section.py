"""The recipe's ``model:`` section: every key it accepts changes what is built."""

from __future__ import annotations

import pytest

from tests.train_helpers import recipe_for
from tunelab.errors import UserError


def test_model_kind_is_not_a_recipe_key(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'model\.kind'"):
        recipe_for(tmp_path, "model: {name: tiny-llama, kind: encoder}\n")
