"""Local training and evaluation: the work a device does each round.

Devices train on their CPU. A simulation may train on CUDA (`use_device("auto")`
or `FEDGE_TORCH_DEVICE=auto`): the model and the client's arrays move to the
GPU for the call and the model comes back to the CPU, so callers never see a
CUDA tensor. With no GPU, "auto" is the CPU, and the CPU path is unchanged.

Plain minibatch SGD (no momentum by default), as in the FedAvg paper: the
optimizer keeps no state between rounds, so a device's memory is the model, its
gradients and one batch, and FedAvg's analysis applies as is. FedProx adds
(mu/2)*||w - w_global||^2 to the loss when `proximal_mu > 0`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

#: environment variable naming the torch device for training and evaluation (cpu|cuda|auto)
DEVICE_ENV = "FEDGE_TORCH_DEVICE"
DEVICE_CHOICES = ("cpu", "cuda", "auto")
_default_device: str | None = None


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """The torch device for `spec`: cpu, cuda[:N], or auto (CUDA when available, else CPU).

    None means the process default: `use_device`'s, else `FEDGE_TORCH_DEVICE`,
    else the CPU (a device's own default). "cuda" without a GPU falls back to
    the CPU too: a simulation asked for a GPU still runs where there is none.
    """
    if isinstance(spec, torch.device):
        return spec
    text = (spec or _default_device or os.environ.get(DEVICE_ENV) or "cpu").strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text != "auto" and not text.startswith("cuda"):
        raise ValueError(f"unknown torch device {text!r}; choose {', '.join(DEVICE_CHOICES)}")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda" if text == "auto" else text)


def use_device(spec: str | None) -> torch.device:
    """Set this process's default device for `train`/`evaluate` (None: back to env/CPU)."""
    global _default_device
    if spec is not None:
        resolve_device(spec)  # refuse a bad name now
    _default_device = spec
    return resolve_device()


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
    device: str | torch.device | None = None,
) -> dict[str, float | int]:
    """Fine-tune `model` in place with minibatch SGD and return its figures.

    `train_loss` is the mean cross-entropy (without the proximal term) over the
    samples of the last epoch: the loss of the weights that are sent back.
    `num_examples` is the number of training samples (FedAvg's weight), not
    samples x epochs. Shuffling is seeded by `seed`. With `proximal_mu > 0` the
    anchor is `global_params` (parameters in `model.parameters()` order, or a
    name->tensor mapping), defaulting to the weights `model` starts from.
    `device` (see `resolve_device`): where the work runs; the model ends on the CPU.
    """
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    xt, yt = _tensor(x, torch.float32), _tensor(y, torch.int64)
    n = int(xt.shape[0])
    if n == 0 or epochs == 0:
        return {"train_loss": 0.0, "num_examples": n}
    dev = resolve_device(device)
    if dev.type == "cpu":
        return _train(model, xt, yt, epochs, batch_size, lr, proximal_mu, global_params, seed,
                      momentum, weight_decay, dev)
    model.to(dev)
    try:
        return _train(model, xt.to(dev), yt.to(dev), epochs, batch_size, lr, proximal_mu,
                      global_params, seed, momentum, weight_decay, dev)
    finally:
        model.to("cpu")


def _train(
    model: nn.Module,
    xt: torch.Tensor,
    yt: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    proximal_mu: float,
    global_params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None,
    seed: int,
    momentum: float,
    weight_decay: float,
    dev: torch.device,
) -> dict[str, float | int]:
    """`train`'s loop, on `dev` (tensors and model already there)."""
    n = int(xt.shape[0])
    on_cpu = dev.type == "cpu"
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    anchor: list[torch.Tensor] = []
    if proximal_mu > 0:
        if global_params is None:
            anchor = [p.detach().clone() for p in params]
        elif isinstance(global_params, Mapping):
            named = dict(model.named_parameters())
            anchor = [
                _tensor(global_params[k], torch.float32).detach().to(dev)
                for k, p in named.items()
                if p.requires_grad
            ]
        else:
            anchor = [_tensor(g, torch.float32).detach().to(dev) for g in global_params]
        if len(anchor) != len(params) or any(
            a.shape != p.shape for a, p in zip(anchor, params, strict=False)
        ):
            raise ValueError("global_params do not match the model's parameters")

    step = _SgdStep(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    model.train()
    epoch_loss = 0.0
    for _ in range(epochs):
        # the permutation is drawn on the CPU: the same batches on every device
        perm = torch.randperm(n, generator=gen)
        if not on_cpu:
            perm = perm.to(dev)
        total: float | torch.Tensor = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = xt[idx], yt[idx]
            step.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            # on a GPU the sum stays there: one synchronisation per epoch, not per batch
            total = total + (float(loss.detach()) if on_cpu else loss.detach()) * len(idx)
            if anchor:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            step()
        epoch_loss = float(total) / n
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
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on (x, y); (0.0, 0.0) when empty.

    On a GPU (`device`, see `resolve_device`) batches are 8x larger and the
    sums stay on the GPU until the end; the model ends on the CPU.
    """
    xt, yt = _tensor(x, torch.float32), _tensor(y, torch.int64)
    n = int(xt.shape[0])
    if n == 0:
        return 0.0, 0.0
    dev = resolve_device(device)
    if dev.type != "cpu":
        model.to(dev)
        try:
            return _evaluate_on(model, xt.to(dev), yt.to(dev), batch_size * 8)
        finally:
            model.to("cpu")
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, n, max(1, batch_size)):
        xb, yb = xt[start : start + batch_size], yt[start : start + batch_size]
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
    return loss_sum / n, correct / n


@torch.no_grad()
def _evaluate_on(model: nn.Module, xt: torch.Tensor, yt: torch.Tensor, batch_size: int
                 ) -> tuple[float, float]:
    """`evaluate` on an accelerator: the sums stay there, one synchronisation at the end."""
    model.eval()
    n = int(xt.shape[0])
    loss_sum = torch.zeros((), device=xt.device, dtype=torch.float64)
    correct = torch.zeros((), device=xt.device, dtype=torch.int64)
    for start in range(0, n, max(1, batch_size)):
        xb, yb = xt[start : start + batch_size], yt[start : start + batch_size]
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
        correct += (logits.argmax(dim=1) == yb).sum()
    return float(loss_sum) / n, int(correct) / n
