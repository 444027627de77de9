"""``tunelab plan``: memory per device of a training run, and which methods and strategies fit."""

from __future__ import annotations

import json
import os

import click

from tunelab.plan.settings import METHODS, OPTIMIZERS, STRATEGIES


def _lora_default(field: str) -> object:
    from tunelab.methods.config import LoraConfig

    return LoraConfig.model_fields[field].default


@click.command("plan")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="Alias, Hugging Face model directory, config.json or .gguf file (weights are never loaded).")
@click.option("--method", type=click.Choice(METHODS), default="lora", show_default=True)
@click.option("--seq", type=int, default=2048, show_default=True, help="Tokens per example.")
@click.option("--batch", type=int, default=8, show_default=True, help="Examples per micro-batch per device (per pipeline under pp).")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="ddp", show_default=True)
@click.option("--devices", type=int, default=1, show_default=True)
@click.option("--device-memory", default=None, help="Memory of one device, e.g. 80GiB or 24GB; default: this machine's GPU, else its RAM.")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="What runs the training: auto is this machine's (a GPU when torch sees one).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 on a GPU, fp32 on a CPU.")
@click.option("--checkpointing/--no-checkpointing", default=False, show_default=True, help="Activation checkpointing (train.gradient_checkpointing).")
@click.option("--lora-r", type=int, default=None, help="LoRA rank (default: tunelab's, method.lora.r).")
@click.option("--lora-targets", default="auto", show_default=True, help="auto, all-linear, or comma-separated block linears (q_proj,v_proj,...).")
@click.option("--lora-dropout", type=float, default=None, help="LoRA dropout (default: tunelab's).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True)
@click.option("--tp-degree", type=int, default=None, help="Tensor-parallel degree for tp / fsdp+tp.")
@click.option("--microbatches", type=int, default=None, help="Pipeline micro-batches per step (pp; default: one per stage).")
@click.option("--supervised", type=float, default=1.0, show_default=True, help="Fraction of positions that carry loss (chat SFT: below 1).")
@click.option("--loss", type=click.Choice(["auto", "fused", "logits"]), default="auto", show_default=True,
              help="auto: the engine's (fused chunked head + loss unless FSDP shards the head).")
@click.option("--runtime-overhead", default=None, help="Bytes the process holds before the model, e.g. 450MiB; default: measured (CPU) or the CUDA context (GPU).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan_command(model_name: str, method: str, seq: int, batch: int, strategy: str, devices: int, device_memory: str | None,
                 device: str, precision: str, checkpointing: bool, lora_r: int | None, lora_targets: str, lora_dropout: float | None,
                 optimizer: str, tp_degree: int | None, microbatches: int | None, supervised: float, loss: str,
                 runtime_overhead: str | None, as_json: bool) -> None:
    """Estimate memory per device (weights, gradients, optimizer state, activations, temporaries,
    runtime) and say which methods and strategies fit, with the largest batch that does."""
    from tunelab.plan import Settings, architecture_from_config, estimate
    from tunelab.plan.fit import verdicts
    from tunelab.plan.model_config import load_config
    from tunelab.plan.report import as_dict, render

    memory_limit = _size(device_memory, "--device-memory") if device_memory is not None else None
    overhead = _size(runtime_overhead, "--runtime-overhead") if runtime_overhead is not None else None
    arch = architecture_from_config(load_config(model_name), model_name)
    kind = _device_kind() if device == "auto" else device
    runtime, runtime_source = _runtime(kind, overhead)
    targets: str | tuple[str, ...] = lora_targets if lora_targets in ("auto", "all-linear") else tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    settings = Settings(
        method=method, seq=seq, batch=batch, precision=("bf16" if kind == "gpu" else "fp32") if precision == "auto" else precision,
        checkpointing=checkpointing, adapter_rank=lora_r or int(_lora_default("r")), adapter_targets=targets,
        adapter_dropout=float(_lora_default("dropout")) if lora_dropout is None else lora_dropout, optimizer=optimizer,
        strategy=strategy, devices=devices, tp_degree=tp_degree, microbatches=microbatches, device=kind,
        supervised_fraction=supervised, fused_loss=None if loss == "auto" else loss == "fused", runtime_bytes=runtime,
    )
    limit = memory_limit if memory_limit is not None else _device_memory(kind)
    result = estimate(arch, settings)
    rows = verdicts(arch, settings, limit)
    if as_json:
        click.echo(json.dumps(as_dict(arch, result, limit, rows, runtime_source), indent=2))
    else:
        click.echo(render(arch, result, limit, rows, runtime_source))


def _size(text: str, option: str) -> int:
    from tunelab.errors import UserError
    from tunelab.plan.units import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise UserError(str(exc), where=option) from None


def _device_kind() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _device_memory(kind: str) -> int:
    """One GPU's memory, or this machine's RAM."""
    if kind == "gpu":
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
        from tunelab.errors import UserError

        raise UserError("no GPU here to read the memory of", where="--device-memory", hint="pass the GPU's memory, e.g. --device-memory 80GiB")
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _runtime(kind: str, overhead: int | None) -> tuple[int, str]:
    from tunelab.plan.runtime import CUDA_CONTEXT_BYTES, cpu_runtime_bytes

    if overhead is not None:
        return overhead, "as given (--runtime-overhead)"
    if kind == "gpu":
        return CUDA_CONTEXT_BYTES, "CUDA context (pytorch/pytorch#34323: 781 MB)"
    return cpu_runtime_bytes(), "measured: Python + torch + the training engine imported"


commands = [plan_command]
