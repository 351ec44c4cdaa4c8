"""Small models for the edge: an MLP for 8x8 digits and the FedAvg paper's CNN.

Every model takes a `seed` so that the coordinator and every simulated device
build bit-identical initial weights without shipping them; the global torch RNG
is left exactly as it was (`torch.random.fork_rng`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run module construction under `seed` without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


class DigitsMLP(nn.Module):
    """64 -> hidden -> 10 MLP for scikit-learn's 8x8 digits (input [N,1,8,8] or [N,64]).

    With the default 64 hidden units it has 4,810 parameters: tiny enough that a
    round is dominated by protocol overhead, which is what the digits demo is for.
    """

    def __init__(self, hidden: int = 64, num_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        with _seeded(seed):
            self.flatten = nn.Flatten()
            self.fc1 = nn.Linear(64, hidden)
            self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.flatten(x))))


class FedAvgCNN(nn.Module):
    """The CNN of McMahan et al. 2017 (FedAvg) for 28x28x1 images.

    conv 5x5x32 ('same') -> ReLU -> maxpool 2 -> conv 5x5x64 ('same') -> ReLU ->
    maxpool 2 -> fc 3136->512 -> ReLU -> fc 512->classes: 1,663,370 parameters
    for 10 classes, the paper's "1,663,370" figure.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, seed: int = 0) -> None:
        super().__init__()
        with _seeded(seed):
            self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=2)
            self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
            self.pool = nn.MaxPool2d(2)
            self.flatten = nn.Flatten()
            self.fc1 = nn.Linear(7 * 7 * 64, 512)
            self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(self.flatten(x))))


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model: embedding 8 -> 2-layer LSTM -> linear on the last step.

    Input: a batch of character indices [N, seq] (any dtype; cast to long), output:
    logits over the next character. With LEAF's 256 hidden units and 80 characters
    it has 819,920 parameters; the `shakespeare` task uses 128 (213,712), 4x cheaper
    on a CPU (common/shakespeare_task.py says why).
    """

    def __init__(
        self, vocab_size: int = 80, embed_dim: int = 8, hidden: int = 256, layers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        with _seeded(seed):
            self.embed = nn.Embedding(vocab_size, embed_dim)
            self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True)
            self.fc = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x.long()))
        return self.fc(out[:, -1])
