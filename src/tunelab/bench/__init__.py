"""Side-by-side training-throughput benchmark: tunelab's engine against Trainer + PEFT.

Both sides train the same model on the same examples in the same order with the same LoRA, optimizer,
schedule and precision; each runs in its own subprocess so their memory peaks stay apart.
``tunelab bench train`` and ``bench/train_throughput.py`` call ``runner.run_benchmark``.
"""
