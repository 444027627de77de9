"""Dropout overrides: set each architecture's hidden and attention rates where its modules read them.

A model fixes its rates when it is built: some in ``nn.Dropout`` modules, some as float attributes
its modules pass to a dropout call at forward time (Llama's attention, BLOOM's residual dropout),
so changing the config afterwards changes nothing. A module's path does not tell the role either:
BERT's ``attention.output.dropout`` drops hidden states, not attention probabilities. So each
supported architecture lists, per role, the module classes and attributes that hold the rate, as
read from its transformers modeling code. A role an architecture does not have is rejected, never
silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.models.bert import modeling_bert as bert
from transformers.models.bloom import modeling_bloom as bloom
from transformers.models.llama import modeling_llama as llama

from tunelab.errors import UserError
from tunelab.methods.base import Method, MethodContext, register_method
from tunelab.methods.config import DropoutConfig


@dataclass(frozen=True)
class Rate:
    """Where one dropout rate lives in one architecture.

    ``sites`` are (module class, attribute) pairs holding an ``nn.Dropout`` or a float. ``heads``
    are task heads whose ``dropout`` module transformers builds from this rate unless the config
    sets ``classifier_dropout``; they follow it so the model equals one built with the new rate.
    The rate is also written to ``config_key`` so the saved config records what was trained.
    """

    config_key: str
    sites: tuple[tuple[type[nn.Module], str], ...]
    heads: tuple[type[nn.Module], ...] = ()


RATES: dict[str, dict[str, Rate]] = {
    "llama": {
        "attention": Rate("attention_dropout", ((llama.LlamaAttention, "attention_dropout"),)),
    },
    "bert": {
        "hidden": Rate(
            "hidden_dropout_prob",
            ((bert.BertEmbeddings, "dropout"), (bert.BertSelfOutput, "dropout"), (bert.BertOutput, "dropout")),
            heads=(bert.BertForSequenceClassification, bert.BertForMultipleChoice, bert.BertForTokenClassification),
        ),
        "attention": Rate(
            "attention_probs_dropout_prob", ((bert.BertSelfAttention, "dropout"), (bert.BertCrossAttention, "dropout"))
        ),
    },
    "bloom": {
        # BloomBlock stores the rate without reading it; kept equal to what a rebuilt block holds.
        "hidden": Rate(
            "hidden_dropout",
            ((bloom.BloomAttention, "hidden_dropout"), (bloom.BloomMLP, "hidden_dropout"), (bloom.BloomBlock, "hidden_dropout")),
            heads=(bloom.BloomForTokenClassification,),
        ),
        "attention": Rate("attention_dropout", ((bloom.BloomAttention, "attention_dropout"),)),
    },
}


def apply_dropout(model: nn.Module, cfg: DropoutConfig) -> nn.Module:
    """Set every rate ``cfg`` names on ``model``; a UserError for a role its architecture lacks."""
    model_type = getattr(model.config, "model_type", "")
    rates = RATES.get(model_type)
    if rates is None:
        raise UserError(
            f"dropout overrides are not supported for {model_type or 'this'} models (supported: {', '.join(sorted(RATES))})",
            where="method.dropout", hint="remove method.dropout from the recipe",
        )
    for role, value in (("hidden", cfg.hidden), ("attention", cfg.attention)):
        if value is None:
            continue
        if role not in rates:
            raise UserError(
                f"{model_type} models have no {role} dropout (only {', '.join(rates)} dropout)",
                where=f"method.dropout.{role}", hint=f"remove method.dropout.{role} from the recipe",
            )
        _set_rate(model, rates[role], value)
    return model


def _set_rate(model: nn.Module, rate: Rate, value: float) -> None:
    setattr(model.config, rate.config_key, value)
    sites = rate.sites
    if getattr(model.config, "classifier_dropout", None) is None:
        sites += tuple((head, "dropout") for head in rate.heads)
    for module in model.modules():
        for cls, attribute in sites:
            if isinstance(module, cls):
                held = getattr(module, attribute)
                if isinstance(held, nn.Dropout):
                    held.p = value
                else:
                    setattr(module, attribute, value)


@register_method
class DropoutMethod(Method):
    key = "dropout"
    Config = DropoutConfig
    order = 10

    def apply(self, model: nn.Module, cfg: DropoutConfig, ctx: MethodContext) -> nn.Module:
        return apply_dropout(model, cfg)
