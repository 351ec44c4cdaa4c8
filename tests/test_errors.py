"""Every reason/detail refusal shares one base: one constructor, one message format."""

from __future__ import annotations

import grpc
import pytest

from fedge.common.chunking import ChunkError
from fedge.common.errors import ReasonError, UpdateRejected
from fedge.common.export import ModelFileError
from fedge.common.signing import SignatureInvalid
from fedge.server.device_identity import IdentityRefused
from fedge.server.enrollment_service import EnrollmentRejected
from fedge.server.model_store import ModelNotFound, ModelStoreError
from fedge.server.registry import RegistryError
from fedge.server.store import StoreError
from fedge.server.tokens import TokenRefused

VALUE_ERRORS = (UpdateRejected, ModelFileError, ChunkError, SignatureInvalid, EnrollmentRejected)
PLAIN = (ModelStoreError, RegistryError, StoreError)


@pytest.mark.parametrize("cls", VALUE_ERRORS + PLAIN)
def test_reason_errors_share_one_message_format(cls: type[ReasonError]) -> None:
    e = cls("bad_thing", "the bytes disagree")
    assert isinstance(e, ReasonError)
    assert (e.reason, e.detail) == ("bad_thing", "the bytes disagree")
    assert str(e) == f"{cls.what} (bad_thing): the bytes disagree"
    assert str(cls("bad_thing")) == f"{cls.what} (bad_thing)"


@pytest.mark.parametrize("cls", VALUE_ERRORS)
def test_value_errors_stay_value_errors(cls: type[ReasonError]) -> None:
    with pytest.raises(ValueError, match=r"\(too_large\)"):
        raise cls("too_large", "x")


def test_errors_with_their_own_arguments_keep_them() -> None:
    token = TokenRefused("expired", "0123456789abcdef")
    assert (token.reason, token.token_id) == ("expired", "0123456789abcdef")
    assert str(token) == "enrollment token refused (expired): 0123456789abcdef"

    identity = IdentityRefused(grpc.StatusCode.PERMISSION_DENIED, "revoked")
    assert (identity.code, identity.reason, identity.detail) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "revoked",
        "",
    )
    assert str(identity) == "device refused (revoked)"

    missing = ModelNotFound("abc")
    assert isinstance(missing, KeyError) and isinstance(missing, ReasonError)
    assert missing.reason == "not_found" and missing.detail == "abc"
