"""Compression: pruning and quantization with their measured cost.

- ``prune``: unstructured/N:M pruning (magnitude, Wanda, Taylor; thresholded or sampled), built on
  ``masks`` and ``calibration``; ``structured``: MLP channels, head groups, blocks (models shrink).
- ``quantize``: dynamic int8, packed weight-only formats (``qlinear``, ``packing``), NF4, selective
  precision (``sensitivity``); ``qat``: fake quantization and exact conversion; ``qlora``: NF4 base.
- ``schedule``, ``lottery``, ``callbacks``: compression during training (gradual pruning, lottery
  tickets, QAT) as trainer callbacks.
- ``steps``, ``run``, ``store``, ``measure``, ``table``: the ``compress:`` stage — build variants,
  save/reload them, measure them in fresh processes, tabulate against the original.
"""
