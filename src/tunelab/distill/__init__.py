"""Knowledge distillation's building blocks that are not plug-ins: the losses as tensor functions,
the teacher cache, the teacher's answers (sequence-level KD), the student's own answers (on-policy
KD), attention capture, and the shapes of students built from their teacher.

The plug-ins live with their kind: the objectives ``kd_logits``/``kd_hints``/``kd_sequence`` in
``tunelab.train.objectives.distill``, ``kd_attention``, ``kd_on_policy`` and ``kd_embedding`` in
their own modules beside it, the student builder ``method.student`` in ``tunelab.methods.student``.
"""
