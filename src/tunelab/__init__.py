"""tunelab: adapt, compress and evaluate language models from one recipe file."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# bitsandbytes (imported by peft) warns on every import on AVX512-BF16 CPUs that an optional
# hub-fetched kernel is missing; tunelab never fetches from a hub, so the warning is noise.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
# peft calls a transformers property that transformers 5 deprecated; users cannot act on it.
_warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
