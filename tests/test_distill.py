"""Distillation: the losses against reference computations, the objectives on tiny models, and
students built from their teacher that reload as ordinary Hugging Face models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tests.train_helpers import recipe_for, train, write_chat_data
from tunelab.data import collate_packed
from tunelab.distill.losses import divergence_terms, hint_loss, logit_kd
from tunelab.errors import UserError
from tunelab.methods.student import StudentConfig, kept_blocks
from tunelab.models import load_model, load_run
from tunelab.recipe import load_recipe
from tunelab.train.objectives.distill import layer_pairs
from tunelab.train.prepare import prepare
from tunelab.train.run import run_training


def _logits(seed: int, rows: int = 5, vocab: int = 11) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_logit_kd_matches_the_reference_divergences(temperature):
    s, t = _logits(0), _logits(1)
    log_s, log_t = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    t2 = temperature**2
    forward = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1) * t2  # KL(teacher || student)
    reverse = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1) * t2
    m = (log_s.exp() + log_t.exp()) / 2
    js = 0.5 * (log_t.exp() * (log_t - m.log())).sum(-1) + 0.5 * (log_s.exp() * (log_s - m.log())).sum(-1)
    assert torch.allclose(logit_kd(s, t, temperature=temperature, divergence="forward"), forward.float(), atol=1e-5)
    assert torch.allclose(logit_kd(s, t, temperature=temperature, divergence="reverse"), reverse.float(), atol=1e-5)
    assert torch.allclose(logit_kd(s, t, temperature=temperature, divergence="js"), (js * t2).float(), atol=1e-5)


@pytest.mark.parametrize("divergence", ["forward", "reverse", "js"])
def test_top_k_over_the_whole_vocabulary_is_the_full_loss_and_the_teacher_itself_costs_nothing(divergence):
    s, t = _logits(2), _logits(3)
    full = logit_kd(s, t, temperature=2.0, divergence=divergence)
    assert torch.equal(logit_kd(s, t, temperature=2.0, divergence=divergence, top_k=s.shape[-1]), full)
    assert not torch.allclose(logit_kd(s, t, temperature=2.0, divergence=divergence, top_k=3), full)
    assert logit_kd(t, t, divergence=divergence).abs().max() < 1e-6


@pytest.mark.parametrize("divergence", ["forward", "reverse", "js"])
def test_the_gradient_of_logit_kd_is_the_finite_difference_one(divergence):
    t = _logits(4, rows=3, vocab=6)
    s = _logits(5, rows=3, vocab=6).requires_grad_(True)

    def kd64(x):  # the same loss in float64 end to end, so finite differences are meaningful
        log_s, log_t = F.log_softmax(x / 2.0, -1), F.log_softmax(t / 2.0, -1)
        return divergence_terms(log_s, log_t, divergence).sum() * 4.0

    assert torch.autograd.gradcheck(kd64, (s,), eps=1e-6, atol=1e-5)
    got = torch.autograd.grad(logit_kd(s.float(), t.float(), temperature=2.0, divergence=divergence).sum(), s)[0]
    want = torch.autograd.grad(kd64(s), s)[0]
    assert torch.allclose(got.float(), want.float(), atol=1e-4)


def test_hint_losses_and_layer_maps():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.allclose(hint_loss(a, b, "mse"), ((a - b) ** 2).mean(-1))
    assert torch.allclose(hint_loss(a, 3 * a, "cosine"), torch.zeros(4), atol=1e-6)
    assert layer_pairs("uniform", 3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert layer_pairs("last", 3, 6) == [(3, 6)]
    with pytest.raises(UserError, match="out of range"):
        layer_pairs([(4, 1)], 3, 6)


def test_students_keep_the_blocks_asked_for():
    assert kept_blocks(StudentConfig(), 6) == [0, 2, 4]
    assert kept_blocks(StudentConfig(keep="ends", num_layers=3), 6) == [0, 1, 5]
    assert kept_blocks(StudentConfig(keep="layers", layers=[5, 0]), 6) == [5, 0]
    with pytest.raises(UserError, match="distinct blocks"):
        kept_blocks(StudentConfig(keep="layers", layers=[6]), 6)


KD = (
    "model: {{name: tiny-llama-20m}}\ndata: {{train: {data}, val_fraction: 0.2}}\n"
    "method: {{student: {{keep: every_other}}}}\n"
    "objective: {{name: {objective}, temperature: 2.0, kd_weight: 1.0, hard_label_weight: {hard}}}\n"
    "train: {{lr: 0.002, batch_size: 4, precision: fp32, max_steps: 12, threads: 1, eval_before: true}}\n"
)


def test_kd_on_the_teacher_itself_is_zero(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    (tmp_path / "r.yaml").write_text(KD.format(data=data, objective="kd_logits", hard=0.0).replace("method: {student: {keep: every_other}}\n", "method: {}\n"))
    recipe = load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'run'}", "objective.temperature=1.0"])
    prepared = prepare(recipe)
    batch = collate_packed(prepared.data.train[:4])
    with torch.no_grad():
        loss, stats = prepared.objective(prepared.model.eval(), batch)
    assert abs(float(loss)) < 1e-4 and stats["tokens"] > 0


@pytest.mark.parametrize("objective", ["kd_logits", "kd_hints"])
def test_a_half_depth_student_learns_from_its_teacher_and_reloads_as_a_plain_model(tmp_path, objective):
    data = write_chat_data(tmp_path / "d.jsonl", n=48)
    summary = run_training(recipe_for(tmp_path, KD.format(data=data, objective=objective, hard=0.0)), show_progress=False)
    assert summary.eval_after["eval_kd"] < summary.eval_before["eval_kd"]  # the student moves towards its teacher
    if objective == "kd_hints":
        assert summary.eval_after["eval_hint"] < summary.eval_before["eval_hint"]
    final = tmp_path / "run" / "final"
    plain = AutoModelForCausalLM.from_pretrained(final / "model")
    assert plain.config.num_hidden_layers == 3 and not any("hint" in n for n in plain.state_dict())
    ids = torch.tensor([[5, 17, 40, 99, 12]])
    ours, _, _ = load_run(tmp_path / "run")
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, ours(ids).logits, atol=1e-6)


def test_a_student_starts_from_the_teachers_kept_blocks(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    (tmp_path / "r.yaml").write_text(KD.format(data=data, objective="kd_logits", hard=0.5))
    student = prepare(load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'run'}"])).model
    teacher = load_model("tiny-llama-20m").model
    for new, old in enumerate([0, 2, 4]):
        for (name, a), b in zip(student.model.layers[new].state_dict().items(), teacher.model.layers[old].state_dict().values()):
            assert torch.equal(a, b), name
        assert student.model.layers[new].self_attn.layer_idx == new  # its KV-cache slot follows it
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)


def test_a_student_with_frozen_blocks_and_lora_saves_only_its_adapter_and_rebuilds_from_the_teacher(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=32)
    text = KD.format(data=data, objective="kd_logits", hard=0.5).replace(
        "method: {student: {keep: every_other}}", "method: {student: {keep: ends, num_layers: 2}, lora: {r: 4, target_modules: all-linear}}"
    ).replace("max_steps: 12", "max_steps: 4")
    run_training(recipe_for(tmp_path, text), show_progress=False)
    final = tmp_path / "run" / "final"
    assert (final / "adapter").exists() and not (final / "model").exists()
    manifest = json.loads((final / "tunelab_model.json").read_text())
    assert manifest["method"]["student"]["keep"] == "ends"
    model, _, _ = load_run(tmp_path / "run")
    assert len(model.base_model.model.model.layers) == 2


def test_a_hint_student_of_another_width_trains_a_projection_it_does_not_keep(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=32)
    text = (
        f"model: {{name: tiny-llama}}\ndata: {{train: {data}}}\nmethod: {{}}\n"
        "objective: {name: kd_hints, teacher: tiny-llama-20m, layers: last, hint_weight: 1.0}\n"
        "train: {lr: 0.01, batch_size: 4, precision: fp32, max_steps: 6, threads: 1, eval_before: true}\n"
    )
    summary = run_training(recipe_for(tmp_path, text), show_progress=False)
    assert summary.eval_after["eval_hint"] < summary.eval_before["eval_hint"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "model")
    assert not any("hint" in n or "objective" in n for n in saved.state_dict())


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, monkeypatch):
    from tunelab.train.objectives import base

    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    (tmp_path / "r.yaml").write_text(KD.format(data=data, objective="kd_logits", hard=0.5))
    recipe = load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'run'}"])

    class OtherVocabulary:
        def get_vocab(self):
            return {"a": 0}

    monkeypatch.setattr(base.ObjectiveContext, "auxiliary_tokenizer", lambda self, name, model_task="causal-lm": OtherVocabulary())
    with pytest.raises(UserError, match="another tokenizer than the student"):
        prepare(recipe)


class StopAfter:
    """Raise KeyboardInterrupt once ``n`` batches of teacher answers were generated (a kill midway)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, real):
        def wrapped(*args, **kwargs):
            if self.n == 0:
                raise KeyboardInterrupt
            self.n -= 1
            return real(*args, **kwargs)

        return wrapped


def _student_grads(prepared, batch) -> dict[str, torch.Tensor]:
    model = prepared.model.train()
    model.zero_grad()
    loss, _ = prepared.objective(model, batch)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cached_teacher_outputs_give_the_gradients_the_live_teacher_gives(tmp_path, monkeypatch):
    from tunelab.distill import teacher_cache

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(teacher_cache, "SHARD_EXAMPLES", 4)  # 19 training examples: 5 shards, a batch spans two
    data = write_chat_data(tmp_path / "d.jsonl", n=24)
    (tmp_path / "r.yaml").write_text(KD.format(data=data, objective="kd_logits", hard=0.5))
    live = prepare(load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'run'}", "objective.top_k=8"]))
    real_write = teacher_cache._write_shard
    monkeypatch.setattr(teacher_cache, "_write_shard", StopAfter(2)(real_write))  # killed while writing the third shard
    with pytest.raises(KeyboardInterrupt):
        prepare(load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'run'}", "objective.top_k=8", "objective.cache=true"]))
    written = []
    monkeypatch.setattr(teacher_cache, "_write_shard", lambda folder, *a: written.append(folder.name) or real_write(folder, *a))
    cached = prepare(load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'run'}", "objective.top_k=8", "objective.cache=true"]))
    assert written == ["shard-00002", "shard-00003", "shard-00004"]  # the two finished shards were kept
    assert len(list((tmp_path / "cache" / "teacher_outputs").iterdir())) == 1
    batch = collate_packed(live.data.train[2:6])  # from two shards
    assert cached.objective.cache.lookup(batch) is not None
    want, got = _student_grads(live, batch), _student_grads(cached, batch)
    assert want.keys() == got.keys() and all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)
    assert cached.objective.cache.lookup(collate_packed(live.data.validation[:2])) is None  # not cached: run live

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran although its outputs were cached")

    monkeypatch.setattr("tunelab.train.objectives.distill.LogitDistillation.teacher_outputs", no_teacher)
    again = prepare(load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'run2'}", "objective.top_k=8", "objective.cache=true"]))
    assert again.objective.cache.directory == cached.objective.cache.directory  # another student reads the same outputs
    with pytest.raises(UserError, match="set objective.top_k"):
        prepare(load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'run3'}", "objective.cache=true"]))


def test_sequence_level_kd_trains_on_the_teachers_answers_and_resumes_their_generation(tmp_path, monkeypatch):
    from tunelab.distill import sequence

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    data = write_chat_data(tmp_path / "d.jsonl", n=20)
    text = (
        f"model: {{name: tiny-llama}}\ndata: {{train: {data}, val_fraction: 0.2}}\nmethod: {{}}\n"
        "objective: {name: kd_sequence, max_new_tokens: 6, batch_size: 4}\n"
        "train: {lr: 0.01, batch_size: 4, precision: fp32, max_steps: 3, threads: 1}\n"
    )
    real = sequence.generate_batch
    monkeypatch.setattr(sequence, "generate_batch", StopAfter(2)(real))
    with pytest.raises(KeyboardInterrupt):
        run_training(recipe_for(tmp_path, text), show_progress=False)
    partial = next((tmp_path / "cache" / "teacher_answers").iterdir()) / "train.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 8  # two batches kept

    calls = []
    monkeypatch.setattr(sequence, "generate_batch", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    (tmp_path / "second").mkdir()
    summary = run_training(recipe_for(tmp_path / "second", text), show_progress=False)
    assert calls == [4, 4] and summary.train_examples == 16 and summary.validation_examples == 4  # only what was missing
    folder = partial.parent
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    originals = {json.loads(line)["messages"][0]["content"]: json.loads(line)["messages"][1]["content"] for line in Path(data).read_text().splitlines()}
    assert len(rows) == 16 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert any(r["messages"][-1]["content"] != originals[r["messages"][0]["content"]] for r in rows)  # the teacher's words, not the data's
    validation = [json.loads(line) for line in (folder / "validation.jsonl").read_text().splitlines()]
    assert all(v["messages"][-1]["content"] == originals[v["messages"][0]["content"]] for v in validation)  # the data's own answers


def test_a_pruned_model_keeps_its_zeros_while_it_recovers_by_distillation(tmp_path):
    loaded = load_model("tiny-llama-20m")
    layer = loaded.model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.weight[:, ::2] = 0  # half of one layer pruned
    loaded.model.save_pretrained(tmp_path / "pruned")
    loaded.tokenizer.save_pretrained(tmp_path / "pruned")
    data = write_chat_data(tmp_path / "d.jsonl", n=32)
    text = (
        f"model: {{name: {tmp_path / 'pruned'}}}\ndata: {{train: {data}}}\nmethod: {{}}\n"
        "objective: {name: kd_logits, teacher: tiny-llama-20m}\ncallbacks: [{name: keep_sparsity}]\n"
        "train: {lr: 0.01, batch_size: 4, precision: fp32, max_steps: 3, threads: 1}\n"
    )
    run_training(recipe_for(tmp_path, text), show_progress=False)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "model")
    weight = trained.model.layers[0].mlp.down_proj.weight
    assert bool((weight[:, ::2] == 0).all()) and bool((weight[:, 1::2] != layer.weight[:, 1::2]).any())  # zeros kept, the rest trained
    assert json.loads((tmp_path / "run" / "keep_sparsity.json").read_text())["layers"] == 1
    with pytest.raises(UserError, match="keep_sparsity found no pruned weights"):
        run_training(recipe_for(tmp_path / "run", text.replace(str(tmp_path / "pruned"), "tiny-llama-20m")), show_progress=False)


def test_a_smaller_encoder_learns_its_teachers_sentence_embeddings_and_saves_for_sentence_transformers(tmp_path):
    from tests.test_objectives_contrastive import write_pairs

    data = write_pairs(tmp_path / "p.jsonl", n=96)
    base = (
        f"model: {{name: tiny-bert}}\ndata: {{train: {data}, val_fraction: 0.2}}\n"
        "method: {head: {type: embedding, pooling: mean}}\nobjective: {name: infonce}\n"
        "train: {lr: 0.003, max_steps: 30, batch_size: 16, precision: fp32, threads: 1, eval_before: true}\n"
    )
    (tmp_path / "teacher").mkdir()
    run_training(recipe_for(tmp_path / "teacher", base), show_progress=False)  # a teacher that learned something
    teacher = tmp_path / "teacher" / "run"
    text = base.replace("method: {head:", "method: {student: {keep: every_other}, head:").replace(
        "objective: {name: infonce}", f"objective: {{name: kd_embedding, teacher: {teacher}, loss: cosine}}"
    )
    summary = run_training(recipe_for(tmp_path, text), show_progress=False)
    assert summary.eval_after["eval_kd"] < summary.eval_before["eval_kd"] / 2 and "eval_mrr" in summary.eval_after
    sentence_transformers = pytest.importorskip("sentence_transformers")
    st = sentence_transformers.SentenceTransformer(str(tmp_path / "run" / "final" / "model"), device="cpu")
    assert st[0].auto_model.config.num_hidden_layers == 1 and st.encode(["cat dog"]).shape == (1, 64)

    (tmp_path / "self.yaml").write_text(base.replace("objective: {name: infonce}", "objective: {name: kd_embedding}"))
    prepared = prepare(load_recipe(tmp_path / "self.yaml", [f"output_dir={tmp_path / 'self'}"]))
    batch = prepared.collate(prepared.data.train[:8])
    with torch.no_grad():
        loss, _ = prepared.objective(prepared.model.eval(), batch)
    assert abs(float(loss)) < 1e-5  # the teacher itself is already where it should be


def test_an_encoder_student_learns_its_teachers_attention_bidirectionally(tmp_path):
    from tests.test_objectives_contrastive import write_pairs

    data = write_pairs(tmp_path / "p.jsonl", n=64)
    text = (
        f"model: {{name: tiny-bert}}\ndata: {{train: {data}, val_fraction: 0.25}}\n"
        "method: {student: {keep: every_other}, head: {type: embedding, pooling: mean}}\n"
        "objective: {name: kd_embedding, kd_weight: 0.0, attention_weight: 1.0, relations: [qk, vv]}\n"
        "train: {lr: 0.003, max_steps: 12, batch_size: 16, precision: fp32, threads: 1, eval_before: true}\n"
    )
    summary = run_training(recipe_for(tmp_path, text), show_progress=False)
    assert summary.eval_after["eval_attention"] < 0.7 * summary.eval_before["eval_attention"]
    (tmp_path / "self.yaml").write_text(text.replace("student: {keep: every_other}, ", ""))
    itself = prepare(load_recipe(tmp_path / "self.yaml", [f"output_dir={tmp_path / 'self'}"]))
    assert itself.objective.transfer.causal is False  # an encoder attends both ways
    with torch.no_grad():
        loss, stats = itself.objective(itself.model.eval(), itself.collate(itself.data.train[:8]))
    assert abs(float(loss)) < 1e-5 and stats["attention_sum"] < 1e-5


def test_attention_relations_are_the_models_causal_attention_maps_and_their_kd_gradient_is_exact():
    from tunelab.distill.losses import relation_kd, relation_log_probs

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4 * 3, generator=g, dtype=torch.float64), torch.randn(5, 2 * 3, generator=g, dtype=torch.float64)
    maps = relation_log_probs(q, k, 4, 2, causal=True).exp()
    for head in range(4):  # grouped-query attention: query heads 0,1 share key head 0; 2,3 key head 1
        qh, kh = q[:, head * 3 : head * 3 + 3], k[:, (head // 2) * 3 : (head // 2) * 3 + 3]
        scores = (qh @ kh.T / 3**0.5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
        assert torch.allclose(maps[head], scores.softmax(-1))
    teacher = relation_log_probs(q, q, 2, 2, causal=True)
    assert relation_kd(teacher, teacher).abs().max() < 1e-12
    student = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: relation_kd(relation_log_probs(x, x, 2, 2, causal=True), teacher).sum(), (student,))


ATTENTION = (
    "model: {{name: tiny-llama-20m}}\ndata: {{train: {data}, val_fraction: 0.2}}\nmethod: {{{method}}}\n"
    "objective: {{name: kd_attention, kd_weight: 0.0, hard_label_weight: 0.0, attention_weight: 1.0{extra}}}\n"
    "train: {{lr: 0.002, batch_size: 4, precision: fp32, max_steps: 12, threads: 1, eval_before: true}}\n"
)


def test_attention_transfer_on_the_teacher_itself_is_zero_and_never_crosses_packed_examples(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    (tmp_path / "r.yaml").write_text(ATTENTION.format(data=data, method="student: {keep: every_other}", extra=", relations: [qk, vv], layers: uniform"))
    student = prepare(load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'run'}"]))
    examples = student.data.train[:3]
    with torch.no_grad():
        _, together = student.objective(student.model.eval(), collate_packed(examples))
        alone = [student.objective(student.model, collate_packed([e]))[1] for e in examples]
    # per token the same whether the examples share a packed row or not (relations stay inside each example)
    lengths = [len(e.input_ids) for e in examples]
    supervised = [s["tokens"] for s in alone]
    per_token_alone = sum(s["attention_sum"] / t * n for s, t, n in zip(alone, supervised, lengths)) / sum(lengths)
    assert together["attention_sum"] / together["tokens"] == pytest.approx(per_token_alone, rel=1e-4)
    assert together["attention_sum"] > 0

    (tmp_path / "r.yaml").write_text(ATTENTION.format(data=data, method="", extra=", relations: [qk, qq, kk, vv], layers: uniform"))
    itself = prepare(load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'run2'}"]))
    with torch.no_grad():
        loss, stats = itself.objective(itself.model.eval(), collate_packed(examples))
    assert abs(float(loss)) < 1e-5 and stats["attention_sum"] < 1e-5


def test_a_student_learns_its_teachers_attention_and_heads_that_cannot_match_are_refused(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=48)
    text = ATTENTION.format(data=data, method="student: {keep: every_other}", extra="")
    summary = run_training(recipe_for(tmp_path, text), show_progress=False)
    assert summary.eval_after["eval_attention"] < 0.8 * summary.eval_before["eval_attention"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "model")
    assert plain.config.num_hidden_layers == 3

    other = ATTENTION.format(data=data, method="", extra=", teacher: tiny-llama-20m, relations: [qk]").replace("name: tiny-llama-20m}", "name: tiny-llama}", 1)
    (tmp_path / "o.yaml").write_text(other)
    with pytest.raises(UserError, match="student has 4 heads, the teacher 8"):
        prepare(load_recipe(tmp_path / "o.yaml", [f"output_dir={tmp_path / 'run3'}"]))
    with pytest.raises(UserError, match="does not split into 3 relation heads"):
        prepare(load_recipe(tmp_path / "o.yaml", [f"output_dir={tmp_path / 'run3'}", "objective.relations=[qq]", "objective.relation_heads=3"]))
    wider = prepare(load_recipe(tmp_path / "o.yaml", [f"output_dir={tmp_path / 'run3'}", "objective.relations=[qq,kk,vv]"]))
    assert wider.objective.transfer.relation_heads == 2  # the student's key/value heads; the 512-wide teacher splits the same way


ON_POLICY = (
    "model: {{name: tiny-llama-20m}}\ndata: {{train: {data}, val_fraction: 0.2}}\nmethod: {{{method}}}\n"
    "objective: {{name: kd_on_policy, on_policy_fraction: {fraction}, max_new_tokens: 6, kd_weight: 1.0, hard_label_weight: 0.0}}\n"
    "train: {{lr: 0.002, batch_size: 4, precision: fp32, max_steps: {steps}, threads: 1, eval_before: true}}\n"
)


def test_on_policy_batches_are_the_students_own_answers_to_the_batchs_prompts(tmp_path):
    from tunelab.distill.on_policy import answered_batch, batch_prompts

    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    (tmp_path / "r.yaml").write_text(ON_POLICY.format(data=data, method="", fraction=1.0, steps=2))
    prepared = prepare(load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'run'}"]))
    examples = prepared.data.train[:3]
    prompts = batch_prompts(collate_packed(examples))
    for prompt, example in zip(prompts, examples):
        first = next(i for i, label in enumerate(example.labels) if label != -100)
        assert prompt.ids == example.input_ids[:first] and prompt.stop == [x for x in example.labels if x != -100][-1]
    sampled = answered_batch(prompts, [[7, 8], [], [9]], collate_packed)
    assert sampled["labels"].ne(-100).sum() == 3 and len(batch_prompts(sampled)) == 2  # loss on the answers; the empty one is dropped
    objective, model = prepared.objective, prepared.model
    with torch.no_grad():
        _, trained = objective(model.train(), collate_packed(examples))
        _, measured = objective(model.eval(), collate_packed(examples))
    assert "kd_on_policy_sum" in trained and "kd_sum" not in trained  # training batches: the student's own answers
    assert "kd_sum" in measured and "kd_on_policy_sum" not in measured  # validation: the data's answers
    decisions = {objective.goes_on_policy(model.train(), collate_packed([e])) for e in prepared.data.train}
    assert decisions == {True}
    objective.cfg = objective.cfg.model_copy(update={"on_policy_fraction": 0.5})
    share = sum(objective.goes_on_policy(model, collate_packed([e])) for e in prepared.data.train) / len(prepared.data.train)
    assert 0.1 < share < 0.9 and objective.goes_on_policy(model, collate_packed(examples)) == objective.goes_on_policy(model, collate_packed(examples))


def test_on_policy_distillation_from_the_teacher_itself_is_zero_and_a_student_learns_from_it(tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=48)
    (tmp_path / "r.yaml").write_text(ON_POLICY.format(data=data, method="", fraction=1.0, steps=2))
    itself = prepare(load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'run0'}"]))
    with torch.no_grad():
        loss, stats = itself.objective(itself.model.train(), collate_packed(itself.data.train[:4]))
    assert abs(float(loss)) < 1e-4 and stats["kd_on_policy_sum"] < 1e-4
    summary = train(tmp_path, ON_POLICY.format(data=data, method="student: {keep: every_other}", fraction=1.0, steps=12))
    assert summary.eval_after["eval_kd"] < summary.eval_before["eval_kd"]  # learning on its own answers brings it closer on the data's too
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "model").config.num_hidden_layers == 3


CALIBRATION = Path(__file__).resolve().parent.parent / "examples/data/heldout/calibration.txt"


def test_a_student_chosen_by_block_importance_keeps_the_blocks_that_change_the_hidden_states_most(tmp_path):
    from tunelab.compress.calibration import block_influence, read_texts, token_chunks
    from tunelab.methods.blocks import block_list

    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    text = KD.format(data=data, objective="kd_logits", hard=0.5).replace(
        "student: {keep: every_other}", f"student: {{keep: importance, num_layers: 2, calibration: {CALIBRATION}, calibration_chunks: 4}}"
    )
    (tmp_path / "r.yaml").write_text(text)
    student = prepare(load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'run'}"])).model
    teacher = load_model("tiny-llama-20m")
    chunks = token_chunks(teacher.tokenizer, read_texts(CALIBRATION), 256, 4)
    influence = block_influence(teacher.model, block_list(teacher.model)[1], chunks)
    assert student.config.tunelab_student_of["blocks_kept"] == sorted(influence.topk(2).indices.tolist())
    with pytest.raises(UserError, match="calibration"):
        load_recipe(tmp_path / "r.yaml", ["method.student.calibration=null"])
    (tmp_path / "cal.txt").write_text(CALIBRATION.read_text())
    assert load_recipe(tmp_path / "r.yaml", ["method.student.calibration=cal.txt"]).method.student.calibration == str(tmp_path / "cal.txt")  # beside the recipe


def test_a_narrower_student_with_fewer_heads_and_channels_rebuilds_exactly_from_its_teacher_when_only_its_adapter_was_saved(tmp_path, monkeypatch):
    from tests.train_helpers import record_final_logits

    data = write_chat_data(tmp_path / "d.jsonl", n=32)
    text = KD.format(data=data, objective="kd_attention", hard=0.5).replace(
        "method: {student: {keep: every_other}}",
        f"method: {{student: {{keep: ends, num_layers: 2, head_fraction: 0.5, mlp_fraction: 0.25, calibration: {CALIBRATION}, calibration_chunks: 2}}, "
        "lora: {r: 4, target_modules: all-linear}}",
    ).replace("max_steps: 12", "max_steps: 3")
    ids = torch.tensor([[5, 17, 40, 99, 12]])
    recorder = record_final_logits(monkeypatch, ids)
    train(tmp_path, text)
    final = tmp_path / "run" / "final"
    assert (final / "adapter").exists() and (final / "student.json").exists() and not (final / "model").exists()
    model, _, _ = load_run(tmp_path / "run")
    inner = model.base_model.model
    assert inner.config.num_attention_heads == 4 and inner.config.num_key_value_heads == 2 and inner.config.intermediate_size == 1056
    assert inner.model.layers[0].mlp.up_proj.base_layer.weight.shape == (1056, 512)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, recorder.logits, atol=1e-5)


@pytest.mark.parametrize("init", ["teacher", "random"])
def test_a_student_of_another_width_starts_from_the_teachers_weights_selected_or_at_random(tmp_path, init):
    data = write_chat_data(tmp_path / "d.jsonl", n=32)
    text = KD.format(data=data, objective="kd_logits", hard=0.0).replace(
        "student: {keep: every_other}", f"student: {{keep: all, config: {{hidden_size: 256, intermediate_size: 512, num_attention_heads: 4, num_key_value_heads: 2}}, init: {init}}}"
    ).replace("max_steps: 12", "max_steps: 6")
    (tmp_path / "r.yaml").write_text(text)
    student = prepare(load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'pre'}"])).model
    teacher = load_model("tiny-llama-20m").model
    selected = torch.equal(student.model.layers[3].mlp.down_proj.weight, teacher.model.layers[3].mlp.down_proj.weight[:256, :512])
    assert selected == (init == "teacher") and student.model.layers[3].self_attn.head_dim == 64
    summary = train(tmp_path, text)
    assert summary.eval_after["eval_kd"] < summary.eval_before["eval_kd"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "model")
    assert plain.config.hidden_size == 256 and plain.config.num_hidden_layers == 6
    with pytest.raises(UserError, match="not num_hidden_layers"):
        prepare(load_recipe(tmp_path / "r.yaml", [f"output_dir={tmp_path / 'x'}", "method.student.config.num_hidden_layers=2"]))


def test_one_recipe_builds_the_student_distils_evaluates_and_compresses_it_from_the_cli(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from tunelab.cli import cli

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    data = write_chat_data(tmp_path / "d.jsonl", n=40)
    rows = [json.loads(line)["messages"] for line in data.read_text().splitlines()[:6]]
    heldout = tmp_path / "eval.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": m[0]["content"], "answer": m[1]["content"]}) + "\n" for m in rows))
    (tmp_path / "r.yaml").write_text(
        f"model: {{name: tiny-llama-20m}}\ndata: {{train: {data}, val_fraction: 0.2}}\n"
        f"method: {{student: {{keep: importance, num_layers: 3, mlp_fraction: 0.25, calibration: {CALIBRATION}, calibration_chunks: 2}}}}\n"
        "objective: {name: kd_logits, top_k: 16, cache: true}\n"
        "train: {lr: 0.002, batch_size: 4, precision: fp32, max_steps: 6, threads: 1}\n"
        f"eval: {{after_training: true, data: {heldout}, max_new_tokens: 4}}\n"
        f"compress: {{heldout: {CALIBRATION}, heldout_texts: 4, max_length: 64, repeats: 1, decode_tokens: 4, prefill_tokens: 16, threads: 1, "
        "variants: [{name: int8, steps: [{quantize: dynamic-int8, smooth: 0}]}]}\n"
    )
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "r.yaml"), f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    student = AutoModelForCausalLM.from_pretrained(run / "final" / "model")
    assert student.config.num_hidden_layers == 3 and student.config.intermediate_size == 1056
    assert (run / "eval").exists() and "int8" in (run / "compress" / "compress.md").read_text()
    assert any((tmp_path / "cache" / "teacher_outputs").iterdir())
