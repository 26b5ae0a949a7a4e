"""The eager fp32 reference of the fused LM head: materialises the ``[T, V]`` logits. The oracle of the tests and the
baseline of the benchmarks."""

from __future__ import annotations

import torch


def fused_linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager fp32 reference: ``(logprobs [T], entropy [T])``, differentiable by autograd; materialises ``[T, V]``.

    Rows whose target is ``ignore_index`` give 0 and no gradient, whatever their hidden state holds (NaN included).

    Example:
        >>> import torch
        >>> lp, ent = fused_linear_logprobs_ref(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, -100, 4]))
        >>> float(lp[1]), float(ent[1])
        (0.0, 0.0)
    """
    valid = targets != ignore_index
    h = torch.where(valid[:, None], hidden.float(), 0.0)  # an ignored row's values never reach a gradient
    logits = h @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    temp = temperature.float()[:, None] if isinstance(temperature, torch.Tensor) else temperature
    x = logits / temp
    logsm = torch.log_softmax(x, dim=-1)
    logp = logsm.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
