"""Local training and evaluation on CPU: the work a device does each round.

Plain minibatch SGD (no momentum by default), as in the FedAvg paper: the
optimizer keeps no state between rounds, so a device's memory is the model, its
gradients and one batch, and FedAvg's analysis applies as is. FedProx adds
(mu/2)*||w - w_global||^2 to the loss when `proximal_mu > 0`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def set_threads(n: int | None) -> None:
    """Cap torch's intra-op threads (small devices; one Ray actor per CPU). None/<=0 keeps."""
    if n is not None and int(n) > 0 and torch.get_num_threads() != int(n):
        torch.set_num_threads(int(n))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with `n` intra-op threads, then restore the process's setting.

    Small models lose badly to thread hand-off on a busy CPU (digits: 0.16 s
    on 1 thread vs 3 s on 2 contended ones), so a task can ask for 1.
    """
    before = torch.get_num_threads()
    set_threads(n)
    try:
        yield
    finally:
        set_threads(before)


def _tensor(a: np.ndarray | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Zero-copy view of a writable numpy array; a copy of a read-only (cached) one."""
    if isinstance(a, torch.Tensor):
        t = a
    elif not isinstance(a, np.ndarray):
        t = torch.as_tensor(np.asarray(a))
    elif a.flags.writeable:
        t = torch.from_numpy(np.ascontiguousarray(a))
    else:
        t = torch.tensor(a)
    return t if dtype is None else t.to(dtype)


def train(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    proximal_mu: float = 0.0,
    global_params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> dict[str, float | int]:
    """Fine-tune `model` in place with minibatch SGD and return its figures.

    `train_loss` is the mean cross-entropy (without the proximal term) over the
    samples of the last epoch: the loss of the weights that are sent back.
    `num_examples` is the number of training samples (FedAvg's weight), not
    samples x epochs. Shuffling is seeded by `seed`. With `proximal_mu > 0` the
    anchor is `global_params` (parameters in `model.parameters()` order, or a
    name->tensor mapping), defaulting to the weights `model` starts from.
    """
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    xt, yt = _tensor(x, torch.float32), _tensor(y, torch.int64)
    n = int(xt.shape[0])
    if n == 0 or epochs == 0:
        return {"train_loss": 0.0, "num_examples": n}

    params = [p for p in model.parameters() if p.requires_grad]
    anchor: list[torch.Tensor] = []
    if proximal_mu > 0:
        if global_params is None:
            anchor = [p.detach().clone() for p in params]
        elif isinstance(global_params, Mapping):
            named = dict(model.named_parameters())
            anchor = [
                _tensor(global_params[k], torch.float32).detach()
                for k, p in named.items()
                if p.requires_grad
            ]
        else:
            anchor = [_tensor(g, torch.float32).detach() for g in global_params]
        if len(anchor) != len(params) or any(
            a.shape != p.shape for a, p in zip(anchor, params, strict=False)
        ):
            raise ValueError("global_params do not match the model's parameters")

    step = _SgdStep(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    model.train()
    epoch_loss = 0.0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = xt[idx], yt[idx]
            step.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            total += float(loss.detach()) * len(idx)
            if anchor:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            step()
        epoch_loss = total / n
    return {"train_loss": epoch_loss, "num_examples": n}


class _SgdStep:
    """SGD with optional momentum and weight decay, as `torch.optim.SGD` computes it.

    Written out because constructing `torch.optim.SGD` imports `torch._dynamo`
    (sympy and ~800 modules): about 70 MB of RSS a device never gets back and
    3.7 s on its first task, which would put a Pi-class device over its budget.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], *, lr: float, momentum: float, weight_decay: float
    ) -> None:
        self.params = params
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def __call__(self) -> None:
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            if self.weight_decay:
                grad = grad.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad)
                grad = buf
            p.add_(grad, alpha=-self.lr)


@torch.inference_mode()  # no autograd bookkeeping at all: tensors made here never need it
def evaluate(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    batch_size: int = 256,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on (x, y); (0.0, 0.0) when empty."""
    xt, yt = _tensor(x, torch.float32), _tensor(y, torch.int64)
    n = int(xt.shape[0])
    if n == 0:
        return 0.0, 0.0
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, n, max(1, batch_size)):
        xb, yb = xt[start : start + batch_size], yt[start : start + batch_size]
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
    return loss_sum / n, correct / n
