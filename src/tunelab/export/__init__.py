"""``tunelab export``: a run's model in the formats other tools load.

``merged``: a plain Hugging Face model directory with every adapter folded in.
``gguf_file``: one GGUF file that llama.cpp (and transformers' GGUF loader) runs, Llama family.
"""
