"""tunelab: adapt, compress and evaluate language models from one recipe file."""

import logging as _logging
import os as _os
import warnings as _warnings

__version__ = "0.1.0"

# bitsandbytes (imported by peft) warns on every import on AVX512-BF16 CPUs that an optional
# hub-fetched kernel is missing; tunelab never fetches from a hub, so the warning is noise.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
# With the `kernels` package installed (transformers 5.25 pulls it in), that same lookup makes
# `kernels` warn, offline, that it skips the hub publisher's trust check: the same noise.
_logging.getLogger("kernels._internals.hf_hub").setLevel(_logging.ERROR)
# peft calls a transformers property that transformers 5 deprecated; users cannot act on it.
_warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# oneDNN (torch's bf16 matmuls on CPU) and ideep above it each cache up to 1,024 compiled matmul
# primitives, one per shape, and never release them. Packed rows change the token count every
# step, so a training run makes ~25 new shapes a step and the caches grew RSS without bound until
# full: 662 MB for 400 token counts of one MLP, 91 MB with 128 entries, at the same speed (a
# SmolLM2 LoRA step uses 25 distinct primitives). Read lazily by both libraries, so this works
# as long as no bf16 matmul ran before tunelab was imported; a user's own setting wins.
#: The cache variables tunelab set (one the user set is kept, and not listed).
BOUNDED_KERNEL_CACHES = tuple(name for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY") if name not in _os.environ)
_os.environ.update(dict.fromkeys(BOUNDED_KERNEL_CACHES, "128"))
