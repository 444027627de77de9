"""Gradient compression for data-parallel training, as DDP communication hooks.

DistributedDataParallel hands each gradient bucket to a hook that must return the averaged
gradient; these hooks change what goes over the wire, nothing else in the engine changes.
``train.distributed.grad_compression.method``:

- ``none``: the plain all-reduce (as DDP without a hook), with its bytes counted: the baseline;
- ``fp16`` / ``bf16``: PyTorch's own cast-then-all-reduce hooks (half the bytes);
- ``powersgd``: PyTorch's PowerSGD (Vogels et al. 2019): rank-``rank`` factors of each gradient
  matrix, with error feedback, after ``start_step`` plain steps;
- ``topk``: each process sends the ``ratio`` largest-magnitude entries of (gradient + its
  residual) as (value, index) pairs through an all-gather, keeps what it did not send as the next
  residual (error feedback, Stich et al. 2018), and every process sums what all sent;
- ``sign``: each process sends one bit per entry (the sign) and its mean magnitude; the result is
  the majority vote of the signs times the mean of the magnitudes (signSGD with majority vote,
  Bernstein et al. 2019: with ``train.optimizer: signsgd`` the update is exactly theirs).

The bytes each process hands to its collectives are counted per step (``comm_bytes``), beside what
the plain fp32 all-reduce of the same buckets would send, so the saving is measured, not assumed.
The residuals (top-k) and PowerSGD's state are per process; checkpoints keep every process's, so a
resumed top-k run continues exactly (PowerSGD rebuilds its error feedback: see ``load_state_dict``).
"""

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from tunelab.train.config import GradCompressionConfig

#: PowerSGD's state that survives a resume: its step count, random state and compression counters.
POWERSGD_KEPT = ("iter", "rng", "total_numel_before_compression", "total_numel_after_compression")


@dataclass
class HookState:
    """What every hook shares: the bytes sent this step, the per-bucket residuals, PowerSGD's state.

    (No ``from __future__ import annotations`` in this module: DDP checks the hooks' annotations
    at registration, and they must be the classes, not strings.)"""

    cfg: GradCompressionConfig
    world: int
    #: Each trainable parameter's name: residuals are kept per parameter, because DDP lays its
    #: buckets out again after the first step (and a resumed process starts from the first layout).
    names: dict[int, str] = field(default_factory=dict)
    sent_bytes: int = 0
    dense_bytes: int = 0
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)
    powersgd: Any = None

    def residual(self, bucket: dist.GradBucket) -> torch.Tensor | None:
        """The bucket's residual, laid out as its buffer (None before anything was held back)."""
        parts = [self.residuals.get(self.names[id(p)]) for p in bucket.parameters()]
        if all(part is None for part in parts):
            return None
        grads = bucket.gradients()
        return torch.cat([torch.zeros(g.numel(), dtype=g.dtype) if part is None else part for part, g in zip(parts, grads)])

    def keep(self, bucket: dist.GradBucket, residual: torch.Tensor) -> None:
        """Hold ``residual`` (laid out as the bucket's buffer) back for the next step, per parameter."""
        start = 0
        for param, grad in zip(bucket.parameters(), bucket.gradients()):
            self.residuals[self.names[id(param)]] = residual[start : start + grad.numel()].clone()
            start += grad.numel()

    def take_counts(self) -> tuple[int, int]:
        """Bytes sent and the fp32 all-reduce's bytes since the last call (one optimizer step)."""
        counts = (self.sent_bytes, self.dense_bytes)
        self.sent_bytes = self.dense_bytes = 0
        return counts

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"residuals": {i: r.cpu() for i, r in self.residuals.items()}}
        if self.powersgd is not None:  # what load_state_dict restores (the rest is tied to DDP's bucket layout)
            state["powersgd"] = {key: getattr(self.powersgd, key) for key in POWERSGD_KEPT}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Top-k residuals come back exactly. PowerSGD's memories are keyed by DDP's bucket index,
        and a new process's first step uses another bucket layout, so PowerSGD resumes with its
        step count and random state but rebuilds its error feedback and warm start."""
        self.residuals = dict(state.get("residuals", {}))
        if self.powersgd is not None and "powersgd" in state:
            for key in POWERSGD_KEPT:
                setattr(self.powersgd, key, state["powersgd"][key])


def _average(state: HookState, tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    state.sent_bytes += tensor.numel() * tensor.element_size()
    return default_hooks._allreduce_fut(None, tensor)  # divides by the world size, then all-reduces


def _plain(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    return _average(state, bucket.buffer())


def _cast(dtype: torch.dtype) -> Any:
    hook = default_hooks.fp16_compress_hook if dtype == torch.float16 else default_hooks.bf16_compress_hook

    def cast_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        state.sent_bytes += bucket.buffer().numel() * 2
        return hook(None, bucket)

    return cast_hook


def _powersgd(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    inner = state.powersgd
    before = inner.total_numel_after_compression
    compressing = inner.iter >= inner.start_powerSGD_iter
    future = powerSGD_hook.powerSGD_hook(inner, bucket)
    numel = inner.total_numel_after_compression - before if compressing else bucket.buffer().numel()
    state.sent_bytes += numel * bucket.buffer().element_size()
    return future


def _gathered(payload: torch.Tensor, world: int) -> torch.futures.Future[list[torch.Tensor]]:
    out = [torch.empty_like(payload) for _ in range(world)]
    return dist.all_gather(out, payload, async_op=True).get_future().then(lambda _: out)


def _topk(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    grad = bucket.buffer()
    residual = state.residual(bucket)
    corrected = grad if residual is None else grad + residual
    k = max(1, math.ceil(state.cfg.ratio * corrected.numel()))
    indices = corrected.abs().topk(k, sorted=False).indices
    values = corrected[indices].float()
    kept = corrected.clone()
    kept[indices] = 0  # error feedback: what was not sent waits for the next step
    state.keep(bucket, kept)
    payload = torch.cat([values.view(torch.int32), indices.to(torch.int32)])
    state.sent_bytes += payload.numel() * payload.element_size()

    def densify(parts: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        total = torch.zeros_like(grad, dtype=torch.float32)
        for part in parts.value():
            total.index_add_(0, part[k:].long(), part[:k].view(torch.float32))
        grad.copy_(total.div_(state.world))
        return grad

    return _gathered(payload, state.world).then(densify)


def _sign(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    grad = bucket.buffer()
    numel = grad.numel()
    bits = torch.nn.functional.pad((grad >= 0).to(torch.uint8), (0, (-numel) % 8)).view(-1, 8)
    packed = (bits * torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)).sum(1, dtype=torch.uint8)
    scale = grad.abs().mean().float().reshape(1).view(torch.uint8)
    payload = torch.cat([scale, packed])
    state.sent_bytes += payload.numel()

    def vote(parts: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        votes = torch.zeros(numel, dtype=torch.float32)
        scales = 0.0
        for part in parts.value():
            scales += float(part[:4].view(torch.float32))
            unpacked = part[4:].unsqueeze(1).bitwise_and(torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)).ne(0)
            votes += unpacked.reshape(-1)[:numel].float() * 2 - 1
        grad.copy_(votes.sign_().mul_(scales / state.world))
        return grad

    return _gathered(payload, state.world).then(vote)


HOOKS = {"none": _plain, "fp16": _cast(torch.float16), "bf16": _cast(torch.bfloat16), "powersgd": _powersgd, "topk": _topk, "sign": _sign}


def _counted(hook: Any) -> Any:
    def counted(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        state.dense_bytes += bucket.buffer().numel() * 4
        return hook(state, bucket)

    return counted


def bucket_cap_mb(model: torch.nn.Module, cfg: GradCompressionConfig | None) -> float | None:
    """One gradient bucket for PowerSGD on gloo (CPU): its callbacks issue blocking all-reduces from
    gloo's worker threads, and with several buckets two processes can issue them in different
    orders and wait for each other forever (measured: a 20M-parameter run hung at its third
    compressed step). Other hooks issue their collectives in bucket order and keep DDP's buckets."""
    if cfg is None or cfg.method != "powersgd" or dist.get_backend() != "gloo":
        return None
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20 + 1


def register_compression(ddp: torch.nn.parallel.DistributedDataParallel, cfg: GradCompressionConfig) -> HookState:
    """Install ``cfg``'s hook on ``ddp``; returns the state that counts its bytes and keeps its residuals."""
    state = HookState(cfg, dist.get_world_size(), {id(p): name for name, p in ddp.module.named_parameters() if p.requires_grad})
    if cfg.method == "powersgd":
        state.powersgd = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=cfg.rank, start_powerSGD_iter=cfg.start_step)
    ddp.register_comm_hook(state, _counted(HOOKS[cfg.method]))
    return state
