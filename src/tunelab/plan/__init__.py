"""``tunelab plan``: how much memory a training run needs per device, before running it.

``estimate(architecture, settings)`` is a pure function from a model's shape and a training
configuration to bytes per device at each moment of a step (``estimate``); ``fit`` turns that
into verdicts and the largest batch that fits a device. ``model_config`` finds a model's shape
from an alias, a directory, a config.json or a GGUF file without loading weights; ``runtime``
measures what the process holds before any model exists. docs/plan.md describes the rules and
their measured accuracy.
"""

from tunelab.plan.architecture import Architecture, architecture_from_config
from tunelab.plan.estimate import Estimate, Moment, estimate
from tunelab.plan.settings import Settings

__all__ = ["Architecture", "Estimate", "Moment", "Settings", "architecture_from_config", "estimate"]
