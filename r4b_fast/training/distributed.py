"""torchrun: joining the process group, FSDP2 sharding of the model, the rank, and the rollout replica's weights."""

from __future__ import annotations

import torch


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_distributed(device: torch.device | None = None) -> tuple[int, int]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group (NCCL when training on GPUs, gloo on CPU);
    returns ``(rank, world_size)``, ``(0, 1)`` for a plain run."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        import datetime

        on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
        # rank 0 alone evaluates and writes checkpoints while the others wait in the next collective
        timeout = datetime.timedelta(seconds=int(os.environ.get("R4B_DIST_TIMEOUT_S", "7200")))
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


class LossModule(torch.nn.Module):
    """Wraps ``loss_fn(model, *args)`` as the module FSDP2 shards at the root, so that the root's parameters
    (embeddings, tied head, vision tower, projector) are gathered for, and reduced after, a computation that reads
    them directly (the fused loss reads ``lm_head.weight``, packing reads the embedding table)."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args, **kwargs):
        return self.loss_fn(self.model, *args, **kwargs)


def shard_model(model, loss_fn, device: torch.device | None = None) -> LossModule:
    """FSDP2: each decoder layer of the language model its own unit, everything else in the root unit (the
    returned :class:`LossModule`, to call instead of ``loss_fn(model, ...)``), on a mesh of ``device``'s type
    (FSDP2's default mesh would be CUDA on a GPU machine even for a ``--device cpu`` run)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),)) if device is not None else None
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    root = LossModule(model, loss_fn)
    fully_shard(root, mesh=mesh)
    return root


@torch.no_grad()
def sync_weights(replica, model) -> None:
    """Copy ``model``'s weights (FSDP2-sharded: every rank must call this, it all-gathers) into ``replica``, a plain
    copy of the same architecture (the rollout engine's weights: generation needs no sharding and ranks may stop
    decoding at different steps)."""
    dst, src = list(replica.named_parameters()), list(model.named_parameters())
    if [n for n, _ in dst] != [n for n, _ in src]:
        raise ValueError("sync_weights: the replica's parameters do not match the model's")
    for (_, p), (_, q) in zip(dst, src):
        p.copy_(q.full_tensor() if hasattr(q, "full_tensor") else q)
