"""Typed errors shared by devices and coordinator.

Decoding code raises exactly these, never IndexError or a numpy error, so the
coordinator can drop a bad reply, record why, and carry on.
"""

from __future__ import annotations


class CodecSpecError(ValueError):
    """A codec spec string is malformed; the message names the bad part."""


class UpdateRejected(ValueError):
    """An update (or any tensor payload) failed validation.

    `reason` is a short stable code for metrics and audit ("malformed",
    "too_large", "non_finite", "shape_mismatch", "bad_bits", "bad_scales",
    "bad_indices", "unexpected_tensor", "missing_tensor", ...); `detail` says
    what exactly disagreed.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"update rejected ({reason}): {detail}" if detail else reason)
