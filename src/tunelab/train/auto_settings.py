"""``train.epochs: auto`` and ``train.lr: auto``: the settings a user gets without tuning.

The rule (docs/choosing_a_method.md has the measurements behind it):

- **epochs**: one pass when the training split holds at least ``EXAMPLES_SEEN`` examples; a
  smaller split is repeated until about that many examples have been seen (``ceil(300 / n)``
  passes, at most ``MAX_EPOCHS``). The shape is OpenAI's documented ``n_epochs: "auto"`` (more
  passes over small files, clamped), with its target lowered from ~3 passes to what CPU time
  allows: one pass over 270-450 examples already reached 0.85-0.97 accuracy on the three label
  tasks measured (sentiment, news topics, intents), and a 101-example intent split reached 0.947
  with the 3 passes the rule gives against 0.527 with one.
- **batch size** (the service's ``batch_size: "auto"``; a recipe states its own): 8, the batch the
  learning rates below were measured at, but at most one sixteenth of the training rows, so that
  a small file still takes at least 16 optimizer steps per pass (``max(1, min(8, n // 16))``).
- **lr**: by what trains. LoRA/DoRA and bottleneck adapters 5e-4 (measured on the tasks above,
  batch 8, cosine); a frozen body with only a new head 1e-3; IA3 3e-3, prefix tuning 1e-2 and
  prompt tuning 3e-2 (peft's published examples, not measured here); full fine-tuning 2e-5 (the
  usual range for full fine-tuning of BERT- and Llama-style models; not measured here).
  Preference objectives (DPO) keep those rates except for full fine-tuning, which gets 5e-7
  (``PREFERENCE_LEARNING_RATES``): the rate of the published full-model DPO recipes (Zephyr,
  Tunstall et al. 2023; not measured here), since updating every weight against a reference moves
  the policy much faster than an adapter does. For LoRA the SFT rate was measured
  (docs/preference.md): on SmolLM2 with 251 factual-shortening pairs, two passes at 5e-4 raised the
  held-out win rate from 0.709 to 0.812, at 5e-5 only to 0.718.
"""

from __future__ import annotations

import math

from tunelab.methods.config import MethodConfig
from tunelab.train.config import TrainConfig

#: How many examples a run should see at least (one pass when the split is at least this large).
EXAMPLES_SEEN = 300
MAX_EPOCHS = 10

#: Learning rate by what trains (see the module docstring for where each value comes from).
LEARNING_RATES = {
    "lora": 5e-4,
    "bottleneck": 5e-4,
    "head_only": 1e-3,
    "ia3": 3e-3,
    "prefix_tuning": 1e-2,
    "prompt_tuning": 3e-2,
    "full": 2e-5,
}


#: Where preference objectives learn at another rate than SFT (see the module docstring).
PREFERENCE_LEARNING_RATES = {"full": 5e-7}
PREFERENCE_OBJECTIVES = ("dpo",)


def auto_lr(method: MethodConfig, objective: str | None = None) -> tuple[float, str]:
    """The learning rate for ``method`` trained with ``objective`` (None: the default), and why."""
    kind = what_trains(method)
    why = kind.replace("_", " ")
    if objective in PREFERENCE_OBJECTIVES and kind in PREFERENCE_LEARNING_RATES:
        return PREFERENCE_LEARNING_RATES[kind], f"{why}, {objective}"
    return LEARNING_RATES[kind], why


#: The batch the automatic learning rates were measured at, and the fewest steps per pass wanted.
AUTO_BATCH_SIZE = 8
MIN_STEPS_PER_EPOCH = 16


def auto_batch_size(train_examples: int) -> int:
    """Examples per step for a training split of ``train_examples`` (see the module docstring)."""
    return max(1, min(AUTO_BATCH_SIZE, train_examples // MIN_STEPS_PER_EPOCH))


def auto_epochs(train_examples: int) -> int:
    """Passes over a training split of ``train_examples`` examples."""
    return max(1, min(MAX_EPOCHS, math.ceil(EXAMPLES_SEEN / max(1, train_examples))))


def what_trains(method: MethodConfig) -> str:
    """The key of ``LEARNING_RATES`` that describes ``method``."""
    family = method.peft_family()
    if family is not None:
        return family
    if method.bottleneck is not None:
        return "bottleneck"
    if method.freeze is not None and method.freeze.base:
        return "head_only"
    return "full"


def resolve(train: TrainConfig, method: MethodConfig, train_examples: int, objective: str | None = None) -> tuple[TrainConfig, list[str]]:
    """``train`` with ``auto`` values replaced by numbers, and one line per replacement saying why."""
    changes, notes = {}, []
    if train.epochs == "auto" and train.max_steps is None:
        changes["epochs"] = float(auto_epochs(train_examples))
        notes.append(f"epochs auto -> {changes['epochs']:g} ({train_examples} training examples; at least {EXAMPLES_SEEN} seen)")
    elif train.epochs == "auto":
        changes["epochs"] = 1.0  # max_steps decides the length; epochs only names the default
    if train.lr == "auto":
        changes["lr"], why = auto_lr(method, objective)
        notes.append(f"lr auto -> {changes['lr']:g} ({why})")
    return train.model_copy(update=changes), notes
