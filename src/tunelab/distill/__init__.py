"""Knowledge distillation's building blocks that are not plug-ins: the losses as tensor functions.

The plug-ins live with their kind: the objectives ``kd_logits``/``kd_hints`` in
``tunelab.train.objectives.distill``, the student builder ``method.student`` in
``tunelab.methods.student``.
"""
