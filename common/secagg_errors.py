"""The one error of secure aggregation, on both sides.

`reason` codes: `bad_key`, `bad_seed`, `share_malformed` (wrong size, out of
the field, duplicate), `share_forged` (fails AEAD authentication),
`share_misaddressed` (a bundle naming another sender, recipient or round),
`too_few_neighbours`, `reconstruction_failed` (shares disagree with the
commitment or public key), `unmask_conflict` (the coordinator asked for both
secrets of one device), `bad_stage`, `bad_config`, `bad_input`, `overflow`.
"""

from __future__ import annotations

from fedge.common.errors import ReasonError


class SecAggRefused(ReasonError, ValueError):
    """A secure-aggregation message or share was refused; `reason` says which rule."""

    what = "secure aggregation refused"
