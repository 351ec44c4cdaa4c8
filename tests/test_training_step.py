"""fedge's SGD step matches torch.optim.SGD, which devices avoid importing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fedge.common.models import DigitsMLP
from fedge.common.training import _SgdStep


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.5, 1e-3)])
def test_step_matches_torch_sgd(momentum: float, weight_decay: float) -> None:
    ours, theirs = DigitsMLP(seed=1), DigitsMLP(seed=1)
    step = _SgdStep(list(ours.parameters()), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=momentum,
                          weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(8, 64, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        for model, do in ((ours, step), (theirs, opt.step)):
            for p in model.parameters():
                p.grad = None
            torch.nn.functional.cross_entropy(model(x), y).backward()
            do()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_training_does_not_import_dynamo() -> None:
    code = (
        "import sys, numpy as np\n"
        "from fedge.common.models import DigitsMLP\n"
        "from fedge.common.training import train\n"
        "x = np.random.rand(32, 1, 8, 8).astype('float32'); y = np.arange(32) % 10\n"
        "train(DigitsMLP(), x, y, epochs=1, batch_size=8, lr=0.1, momentum=0.9)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
