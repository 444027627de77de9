"""The ``method:`` section: which parameters train and which modules are added.

Sub-sections compose; a recipe with none of them is full fine-tuning.
"""

from __future__ import annotations

from pydantic import Field

from tunelab.config_base import Section


class MethodConfig(Section):
    """Methods applied to the model before training, in a fixed, documented order."""

    full: bool = Field(True, description="Train every parameter unless another method says otherwise.")
