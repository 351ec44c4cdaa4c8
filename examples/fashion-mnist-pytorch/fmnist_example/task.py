"""fmnist_example: the model, the data and the training loop (plain PyTorch).

Fashion-MNIST comes from the IDX files Debian's `dataset-fashion-mnist`
installs (no download). Each client trains on its own small IID slice of
the training set, chosen by `partition-id` / `num-partitions` from the
node config and the run's `seed`, so every runtime gives a client the
same examples.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)  # small devices; also keeps runs reproducible


class Net(nn.Module):
    """A small CNN for 28x28 grey images (about 80 k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def new_model(seed: int) -> Net:
    """The initial global model: the same weights for the same seed."""
    torch.manual_seed(seed)
    return Net()


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain) as a numpy array: magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(data_dir: str, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        path = Path(data_dir) / name
        if path.exists():
            return path
    raise FileNotFoundError(f"{stem}(.gz) not found in {data_dir}; install Debian's "
                            "dataset-fashion-mnist or set run config data-dir")


@lru_cache(maxsize=4)
def _split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find(data_dir, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(data_dir, f"{prefix}-labels-idx1-ubyte"))
    return images, labels


def _tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = torch.from_numpy((images.astype(np.float32) / 255.0 - 0.5) / 0.5).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def load_partition(
    data_dir: str, partition_id: int, num_partitions: int, samples: int, seed: int
) -> TensorDataset:
    """This client's `samples` training examples: its slice of a seeded permutation."""
    images, labels = _split(data_dir, "train")
    order = np.random.default_rng(seed).permutation(len(labels))
    mine = order[partition_id * samples: (partition_id + 1) * samples]
    if num_partitions * samples > len(labels) or len(mine) < samples:
        raise ValueError(f"{num_partitions} x {samples} samples exceed the training set")
    return _tensors(images[mine], labels[mine])


def load_test(data_dir: str, samples: int) -> TensorDataset:
    """The first `samples` images of the test set: the central evaluation."""
    images, labels = _split(data_dir, "test")
    return _tensors(images[:samples], labels[:samples])


def train(
    net: nn.Module, dataset: TensorDataset, epochs: int, lr: float, batch_size: int, seed: int
) -> float:
    """SGD over the local data; the shuffle is seeded so reruns agree. Returns the mean loss."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    net.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
    return total / max(1, batches)


@torch.no_grad()
def test(net: nn.Module, dataset: TensorDataset) -> tuple[float, float]:
    """Loss and accuracy on `dataset`."""
    net.eval()
    x, y = dataset.tensors
    logits = net(x)
    loss = float(F.cross_entropy(logits, y))
    accuracy = float((logits.argmax(1) == y).float().mean())
    return loss, accuracy
