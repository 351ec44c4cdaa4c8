"""What devices and coordinator agree on in secure aggregation: stages, keys, graph, bundles.

One round is four message exchanges, each a Flower `train` message whose
ConfigRecord `fedge.secagg` (`SECAGG_RECORD`) names the stage:

1. `advertise`: the device makes two X25519 key pairs and returns the publics.
2. `share-keys`: given its neighbours' publics, it draws a self-mask seed,
   Shamir-shares that seed and its `s` secret key among its neighbours,
   encrypts each neighbour's pair of shares (AES-GCM), and returns the
   bundles plus a commitment to the seed.
3. `masked-input`: the message also carries the model and train config; the
   device trains (the app runs), quantizes its delta with the broadcast
   clipping ranges into the ring and returns it masked by its self-mask and
   one pairwise mask per live neighbour.
4. `unmask`: given who survived and who dropped, it returns its shares of
   survivors' self-mask seeds and of dropped devices' `s` keys, never both
   for one device.

The communication graph is a Harary-style k-regular graph on a public
permutation (SecAgg+): each device talks to k = O(log n) others, so a
device's cost grows with log n, not n.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from fedge.common.secagg_crypto import SHARE_BYTES
from fedge.common.secagg_errors import SecAggRefused

#: ConfigRecord carrying the stage and its fields, in messages and replies
SECAGG_RECORD = "fedge.secagg"
#: the masked words in a masked-input reply's ArrayRecord (raw bytes, stype below)
MASKED_KEY = "fedge.secagg.masked"
MASKED_STYPE = "fedge.secagg.packed-words"
#: device `context.state` keys: the round's secrets, and the error-feedback residual
STATE_KEY = "fedge.secagg"
RESIDUAL_STATE_KEY = "fedge.secagg.residual"

STAGE = "stage"
ADVERTISE = "advertise"
SHARE_KEYS = "share-keys"
MASKED_INPUT = "masked-input"
UNMASK = "unmask"
STAGES = (ADVERTISE, SHARE_KEYS, MASKED_INPUT, UNMASK)

# field names inside SECAGG_RECORD
ROUND_TAG = "round-tag"
INDEX = "index"
CLIENTS = "clients"
BITS = "bits"
THRESHOLD = "threshold"
C_PK = "c-pk"
S_PK = "s-pk"
NEIGHBOURS = "neighbours"
C_PKS = "c-pks"
S_PKS = "s-pks"
TO = "to"
FROM = "from"
BUNDLES = "bundles"
COMMIT = "commit"
CLIP = "clip"
ERROR_FEEDBACK = "error-feedback"
WORDS = "words"
SURVIVORS = "survivors"
DROPPED = "dropped"
SEED_OF = "seed-of"
SEED_SHARES = "seed-shares"
KEY_OF = "key-of"
KEY_SHARES = "key-shares"

_BUNDLE = struct.Struct("<II")
BUNDLE_BYTES = _BUNDLE.size + 2 * SHARE_BYTES


#: dropout rate a round's default graph tolerates, and the chance it may fail at that rate
DEFAULT_MAX_DROPOUT = 0.2
DEFAULT_FAILURE = 1e-3


def default_threshold(degree: int) -> int:
    """Shares needed to reconstruct: a majority of a device's neighbours."""
    return degree // 2 + 1


def short_of_threshold(degree: int, threshold: int, dropout: float) -> float:
    """P(a device keeps fewer than `threshold` of `degree` neighbours) at independent `dropout`."""
    return sum(
        math.comb(degree, j) * dropout**j * (1 - dropout) ** (degree - j)
        for j in range(degree - threshold + 1, degree + 1)
    )


def default_degree(
    clients: int, max_dropout: float = DEFAULT_MAX_DROPOUT, failure: float = DEFAULT_FAILURE
) -> int:
    """Neighbours per device: at least 2 ceil(log2 n) + 2 (even), raised until, with a majority
    threshold and `max_dropout` of devices vanishing at random, some device of the n is left
    short of its threshold with probability <= `failure` (union bound); all others for small n.

    (For 100 devices and 20 % dropout: 44; the bare logarithmic floor, 16, fails a round
    half of the time at that rate.)
    """
    if clients <= 1:
        return 0
    k = 2 * math.ceil(math.log2(clients)) + 2
    while (
        k < clients - 1
        and clients * short_of_threshold(k, default_threshold(k), max_dropout) > failure
    ):
        k += 2
    return min(k, clients - 1)


def neighbour_graph(clients: int, degree: int, seed: int) -> list[list[int]]:
    """Each participant's sorted neighbours: a k-regular ring lattice on a public permutation.

    Both sides can recompute it from (clients, degree, seed); an odd degree
    below n - 1 is raised by one (the lattice is symmetric).
    """
    if degree >= clients - 1:
        return [[j for j in range(clients) if j != i] for i in range(clients)]
    half = (degree + 1) // 2
    perm = np.random.default_rng(seed).permutation(clients)
    position = np.empty(clients, np.int64)
    position[perm] = np.arange(clients)
    out = []
    for i in range(clients):
        p = int(position[i])
        near = {int(perm[(p + d) % clients]) for d in range(-half, half + 1) if d != 0}
        out.append(sorted(near))
    return out


def share_point(index: int) -> int:
    """The Shamir x of the share a participant holds: its index + 1 (never 0)."""
    return index + 1


@dataclass(frozen=True)
class ShareBundle:
    """What one device sends one neighbour: its shares of the self-mask seed and `s` key."""

    sender: int
    recipient: int
    seed_share: bytes
    key_share: bytes

    def to_bytes(self) -> bytes:
        return _BUNDLE.pack(self.sender, self.recipient) + self.seed_share + self.key_share

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareBundle:
        if len(data) != BUNDLE_BYTES:
            raise SecAggRefused(
                "share_malformed", f"bundle of {len(data)} bytes, expected {BUNDLE_BYTES}"
            )
        sender, recipient = _BUNDLE.unpack_from(data)
        body = data[_BUNDLE.size :]
        return cls(sender, recipient, body[:SHARE_BYTES], body[SHARE_BYTES:])


def round_tag(run_id: int, server_round: int, nonce: bytes) -> bytes:
    """Names one secure-aggregation round in every derivation (run, round, a fresh nonce)."""
    return f"{run_id}:{server_round}:".encode() + nonce.hex().encode()
