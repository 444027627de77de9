"""The ``eval:`` section: what to measure after (and during) training."""

from __future__ import annotations

from pydantic import Field

from tunelab.config_base import Section


class EvalConfig(Section):
    """Evaluation settings."""

    metrics: list[str] = Field(default_factory=list, description="Metric names; `tunelab metrics --help` lists them.")
