"""Typed errors shared by devices and coordinator.

Decoding code raises exactly these, never IndexError or a numpy error, so the
coordinator can drop a bad reply, record why, and carry on.
"""

from __future__ import annotations

from typing import ClassVar


class ReasonError(Exception):
    """An error with a stable `reason` code and a human `detail`.

    `reason` is what metrics, audit and status tables key on; `detail` is for
    the person reading the message. Every refusal in fedge has this shape, so
    it has one constructor and one message format: ``"<what> (<reason>): <detail>"``
    (without ``": <detail>"`` when there is none). Subclasses set `what`; an empty
    `what` means the detail is already the whole line a person reads.
    """

    what: ClassVar[str] = "refused"

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        if not self.what:
            super().__init__(detail or reason)
            return
        suffix = f": {detail}" if detail else ""
        super().__init__(f"{self.what} ({reason}){suffix}")


class CodecSpecError(ValueError):
    """A codec spec string is malformed; the message names the bad part."""


class UpdateRejected(ReasonError, ValueError):
    """An update (or any tensor payload) failed validation.

    `reason` is a short stable code for metrics and audit ("malformed",
    "too_large", "non_finite", "shape_mismatch", "bad_bits", "bad_scales",
    "bad_indices", "unexpected_tensor", "missing_tensor", ...); `detail` says
    what exactly disagreed.
    """

    what = "update rejected"
