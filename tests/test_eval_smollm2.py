"""The packaged SmolLM2 through the choice path: its chat template, one-token options, exact batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data.readers import Row
from tunelab.evaluate.likelihood import continuation_logprobs, split_tokens
from tunelab.evaluate.prompts import PromptBuilder

BOOLQ = Path(__file__).resolve().parents[1] / "examples" / "data" / "eval" / "boolq-eval.jsonl"


@pytest.mark.slow
def test_boolq_items_score_one_forward_per_item_and_match_unbatched():
    import torch

    from tunelab.models import load_model

    loaded = load_model("smollm2-135m")
    rows = [Row(json.loads(line), f"boolq:{i}") for i, line in enumerate(BOOLQ.read_text().splitlines()[:2], 1)]
    builder = PromptBuilder(loaded.tokenizer, "{passage}\nQuestion: {question}?\nAnswer yes or no.", "chat")
    contexts = [builder.context(row) for row in rows]
    assert all(ctx.endswith("<|im_start|>assistant\n") for ctx in contexts)
    requests = [(ctx, option) for ctx in contexts for option in ("no", "yes")]
    assert all(len(split_tokens(loaded.tokenizer, c, o, False)[1]) == 1 for c, o in requests)  # one token each
    scored = continuation_logprobs(loaded.model, loaded.tokenizer, requests, add_special_tokens=False, batch_size=4)
    for (ctx, option), result in zip(requests, scored):
        head, tail = split_tokens(loaded.tokenizer, ctx, option, False)
        with torch.no_grad():
            logits = loaded.model(torch.tensor([head])).logits[0, -1]
        assert result.logprob == pytest.approx(torch.log_softmax(logits, -1)[tail[0]].item(), abs=1e-3)
