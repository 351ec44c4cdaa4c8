"""The HTTP API's authentication: every refusal, against a real uvicorn on 127.0.0.1 (httpx).

Devices are enrolled for real (the enrollment service on loopback, `enroll`
as `fedge enroll` runs it), so the certificates are the ones devices hold.
Binding beyond loopback is refused before any socket opens; the tests check
that path without binding anything but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from enrollment_harness import EnrollmentHarness, csr_pem, key_pem, p256_key, start_harness
from test_registry import State, make_state
from typer.testing import CliRunner

from fedge.cli import app as fedge_app
from fedge.client.enroll import DeviceCredentials, EnrollError, enroll
from fedge.client.inference_device import InferenceDevice, device_ssl_context, model_path
from fedge.common.onnx_runtime import load_onnx_predictor
from fedge.server.enrollment_service import Enroller
from fedge.server.http_api import HttpServer, make_http_app
from fedge.server.http_auth import (
    TOKENS_FILE,
    BindRefused,
    HttpAuth,
    TokenFile,
    auth_for_state,
    check_bind,
    is_loopback,
)
from fedge.server.metrics import Metrics
from fedge.server.rate_limit import RateLimiter
from fedge.server.store import DeviceStatus
from fedge.server.tls import sign_csr
from fedge.v1.enrollment_pb2 import EnrollRequest

# -- binding beyond loopback ---------------------------------------------------------------


def test_loopback_is_recognised() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "", "::", "10.0.0.7", "192.168.1.2", "pi.local", "example.org"):
        assert not is_loopback(host), host


def test_bind_beyond_loopback_without_auth_is_refused_in_one_line() -> None:
    for host in ("0.0.0.0", "10.0.0.7", "::"):
        with pytest.raises(BindRefused) as e:
            check_bind(host, "none", tls=True)
        message = str(e.value)
        assert "\n" not in message and "--http-auth" in message and host in message
    # tokens beyond loopback need TLS; client certificates need TLS anywhere
    with pytest.raises(BindRefused, match="need TLS"):
        check_bind("10.0.0.7", "token", tls=False)
    for mode in ("mtls", "any"):
        with pytest.raises(BindRefused, match="need TLS"):
            check_bind("127.0.0.1", mode, tls=False)
    with pytest.raises(BindRefused, match="one of"):
        check_bind("127.0.0.1", "password", tls=True)
    # what is allowed
    check_bind("127.0.0.1", "none", tls=False)
    check_bind("127.0.0.1", "token", tls=False)
    for mode in ("mtls", "token", "any"):
        check_bind("0.0.0.0", mode, tls=True)


def test_http_server_refuses_before_binding(tmp_path: Path) -> None:
    state = make_state(tmp_path / "state")
    try:
        server = HttpServer(make_http_app(state.registry, Metrics()), host="0.0.0.0", port=0)
        with pytest.raises(BindRefused):
            server.start()
        assert server._server is None and server._thread is None  # nothing was started
    finally:
        state.store.close()


def test_coordinator_run_refuses_before_anything_starts(tmp_path: Path) -> None:
    runner = CliRunner()
    cases = [
        (["--http-host", "0.0.0.0"], "--http-auth"),
        (["--http-host", "10.0.0.7", "--http-auth", "token", "--insecure"], "need TLS"),
        (["--http-auth", "mtls", "--insecure"], "need TLS"),
    ]
    for extra, says in cases:
        state = tmp_path / f"state-{len(extra)}-{extra[-1]}"
        result = runner.invoke(
            fedge_app,
            ["coordinator", "run", "--state", str(state), "--port", "0", "--http-port", "0",
             "--task", "digits", *extra],
        )
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and says in lines[0], lines
        assert not state.exists()  # refused before any state was created


# -- tokens --------------------------------------------------------------------------------


def test_tokens_are_hashed_at_rest_with_scopes(tmp_path: Path) -> None:
    book = TokenFile(tmp_path / TOKENS_FILE)
    reader = book.add(["read"], "dashboard")
    both = book.add(["read", "predict"])
    stored = (tmp_path / TOKENS_FILE).read_text()
    for token in (reader, both):
        assert token.split(".")[2] not in stored  # the secret is never written
    assert os.stat(tmp_path / TOKENS_FILE).st_mode & 0o777 == 0o600
    assert book.check(reader) == frozenset({"read"})
    assert book.check(both) == frozenset({"read", "predict"})
    wrong = reader[:-1] + ("A" if reader[-1] != "A" else "B")
    for bad in (wrong, "", "fdgh1.x.y", reader + "x", reader.replace("fdgh1", "fdg1"), "x" * 500):
        assert book.check(bad) is None, bad
    assert book.revoke(reader.split(".")[1]) and book.check(reader) is None
    assert not book.revoke(reader.split(".")[1])
    assert TokenFile(tmp_path / TOKENS_FILE).check(both) is not None  # another reader sees it
    with pytest.raises(ValueError):
        book.add(["admin"])
    with pytest.raises(ValueError):
        book.add([])


# -- a real server -------------------------------------------------------------------------


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[tuple[EnrollmentHarness, State]]:
    """A state folder with models (current promoted), TLS files and the enrollment service."""
    state = make_state(tmp_path / "state")
    state.registry.promote(state.versions[2], reason="test")
    h = await start_harness(tmp_path / "state")
    try:
        yield h, state
    finally:
        await h.close()
        state.store.close()


async def _enroll(h: EnrollmentHarness, data: Path) -> DeviceCredentials:
    issued = h.tokens.create(ttl_s=600, label="viewer")
    ca = h.paths.ca_cert.read_bytes()
    return await asyncio.to_thread(enroll, h.target, issued.token, ca, data_dir=data,
                                   name="viewer")


class Api:
    """An HTTP API with `auth` on 127.0.0.1; `client(...)` opens httpx clients to it."""

    def __init__(self, state: State, auth: HttpAuth, enroller: Enroller | None = None) -> None:
        self.ca = str(auth.client_ca or "")
        self.server = HttpServer(make_http_app(state.registry, Metrics(), predict_cap=8,
                                               auth=auth, enroller=enroller))
        self.port = self.server.start()
        self.url = f"{self.server.scheme}://127.0.0.1:{self.port}"

    def client(self, *, cert: tuple[str, str] | None = None,
               token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        verify: ssl.SSLContext | bool = False
        if self.url.startswith("https"):
            verify = ssl.create_default_context(cafile=self.ca)
            if cert:
                verify.load_cert_chain(*cert)
        return httpx.Client(base_url=self.url, verify=verify, headers=headers, timeout=30)


@pytest.fixture
def api_factory(harness: tuple[EnrollmentHarness, State]) -> Iterator:
    started: list[Api] = []
    h, state = harness

    def make(mode: str, enroller: Enroller | None = None) -> Api:
        api = Api(state, auth_for_state(mode, h.state, h.paths, h.store),
                  enroller or h.service.enroller)
        started.append(api)
        return api

    yield make
    for api in started:
        api.server.stop()


def _predict_body() -> dict:
    return {"inputs": np.random.default_rng(0).random((2, 1, 8, 8)).round(3).tolist()}


def test_tokens_scopes_each_refusal(harness, api_factory) -> None:
    h, state = harness
    api = api_factory("token")
    assert api.url.startswith("https://")
    book = TokenFile(h.state / TOKENS_FILE)
    reader, predictor = book.add(["read"]), book.add(["predict"])
    with api.client() as anonymous:
        assert anonymous.get("/healthz").status_code == 200  # liveness stays open
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/current"),
                             ("GET", "/metrics")):
            r = anonymous.request(method, path)
            assert r.status_code == 401 and r.json()["error"] == "unauthenticated", path
            assert r.headers["www-authenticate"] == "Bearer"
        r = anonymous.post("/v1/predict", json=_predict_body())
        assert r.status_code == 401
    with api.client(token=reader[:-2] + "xx") as forged:
        assert forged.get("/v1/models").status_code == 401
    with api.client(token=reader) as read_only:
        assert read_only.get("/v1/models").json()["current"] == state.versions[2]
        r = read_only.get("/v1/models/current", params={"format": "onnx-int8"})
        assert r.status_code == 200 and load_onnx_predictor(r.content).info.format == "onnx-int8"
        r = read_only.post("/v1/predict", json=_predict_body())
        assert r.status_code == 403 and "'predict'" in r.json()["detail"]
    with api.client(token=predictor) as predict_only:
        r = predict_only.post("/v1/predict", json=_predict_body())
        assert r.status_code == 200 and r.json()["count"] == 2
        assert predict_only.get("/v1/models/current").status_code == 403
    # revoked while the server runs: refused on the next request, no restart
    book.revoke(reader.split(".")[1])
    with api.client(token=reader) as revoked:
        assert revoked.get("/v1/models").status_code == 401
    # over plaintext the server cannot be reached at all: it speaks TLS only
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{api.port}/healthz", timeout=10)
    # an inference-only device without an identity: a token with `read`, or nothing
    trust = ssl.create_default_context(cafile=str(h.paths.ca_cert))
    folder = h.state.parent / "token-device"
    holder = book.add(["read"])
    device = InferenceDevice(api.url, folder, fmt="onnx", ssl_context=trust, token=holder)
    assert device.check_once().outcome == "installed"
    bare = InferenceDevice(api.url, h.state.parent / "bare", fmt="onnx", ssl_context=trust)
    denied = bare.check_once()
    assert denied.outcome == "denied" and "401" in denied.detail
    with pytest.raises(ValueError, match="https://"):  # a token never travels in plaintext
        InferenceDevice(f"http://127.0.0.1:{api.port}", folder, token=holder)


def test_inference_only_cli_refuses_a_token_over_plaintext(tmp_path: Path, monkeypatch) -> None:
    from fedge.client.inference_device import TOKEN_ENV, run_cli

    monkeypatch.setenv(TOKEN_ENV, "fdgh1.0123456789abcdef." + "A" * 43)
    with pytest.raises(ValueError, match="plaintext"):
        run_cli("http://127.0.0.1:9", tmp_path, fmt="onnx", interval_s=1.0)


async def test_device_certificates_each_refusal(harness, api_factory, tmp_path: Path) -> None:
    h, state = harness
    creds = await _enroll(h, tmp_path / "viewer")
    cert = (str(creds.cert_path), str(creds.key_path))
    api = api_factory("mtls")

    def calls() -> None:
        with api.client(cert=cert) as device:
            r = device.get("/v1/models/current", params={"format": "onnx"})
            assert r.status_code == 200 and r.headers["x-fedge-version"] == state.versions[2]
            assert device.get("/v1/models").status_code == 200
            r = device.post("/v1/predict", json=_predict_body())
            assert r.status_code == 403  # enrolled devices read; predictions need a token
        # no certificate: the handshake lets it through (a device enrolls without one), every
        # route but /healthz and /v1/enroll refuses it
        with api.client() as anonymous:
            assert anonymous.get("/healthz").status_code == 200
            for path in ("/v1/models", "/v1/models/current", "/metrics"):
                r = anonymous.get(path)
                assert r.status_code == 401 and r.json()["error"] == "unauthenticated", path
        # our CA's signature but no enrolled device holds the certificate
        key = p256_key()
        stray_dir = tmp_path / "stray"
        stray_dir.mkdir()
        (stray_dir / "key.pem").write_bytes(key_pem(key))
        (stray_dir / "cert.pem").write_bytes(
            sign_csr(csr_pem(key), h.paths, device_id=creds.device_id))
        stray = (str(stray_dir / "cert.pem"), str(stray_dir / "key.pem"))
        with api.client(cert=stray) as client:
            r = client.get("/v1/models")
            assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
        # the inference-only device fetches with its identity
        device = InferenceDevice(api.url, tmp_path / "viewer", fmt="onnx-int8",
                                 ssl_context=device_ssl_context(tmp_path / "viewer"))
        result = device.check_once()
        assert result.outcome == "installed" and result.version == state.versions[2], result
        assert model_path(tmp_path / "viewer", "onnx-int8").suffix == ".onnx"
        # revoked: refused on its very next request
        h.store.set_device_status(creds.device_id, DeviceStatus.REVOKED)
        with api.client(cert=cert) as device_client:
            r = device_client.get("/v1/models")
            assert r.status_code == 403 and r.json()["error"] == "revoked"
        denied = device.check_once()
        assert denied.outcome == "denied" and "403" in denied.detail

    await asyncio.to_thread(calls)


async def test_any_takes_a_certificate_or_a_token(harness, api_factory, tmp_path: Path) -> None:
    h, _ = harness
    creds = await _enroll(h, tmp_path / "viewer")
    api = api_factory("any")
    token = TokenFile(h.state / TOKENS_FILE).add(["read", "predict"])

    def calls() -> None:
        with api.client(cert=(str(creds.cert_path), str(creds.key_path))) as device:
            assert device.get("/v1/models").status_code == 200
        with api.client(token=token) as holder:
            assert holder.get("/v1/models").status_code == 200
            assert holder.post("/v1/predict", json=_predict_body()).status_code == 200
        with api.client() as anonymous:
            r = anonymous.get("/v1/models")
            assert r.status_code == 401 and "certificate or" in r.json()["detail"]

    await asyncio.to_thread(calls)


def test_http_token_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    state = tmp_path / "state"
    state.mkdir()
    added = runner.invoke(fedge_app, ["coordinator", "http-token", "add", "--scope", "read",
                                      "--label", "grafana", "--state", str(state)])
    assert added.exit_code == 0, added.output
    token = added.output.strip()
    assert TokenFile(state / TOKENS_FILE).check(token) == frozenset({"read"})
    listed = runner.invoke(fedge_app, ["coordinator", "http-token", "list", "--state", str(state)])
    rows = json.loads(listed.output)
    assert [r["label"] for r in rows] == ["grafana"] and token not in listed.output
    bad = runner.invoke(fedge_app, ["coordinator", "http-token", "add", "--scope", "admin",
                                    "--state", str(state)])
    assert bad.exit_code == 2 and "read or predict" in bad.output
    revoked = runner.invoke(fedge_app, ["coordinator", "http-token", "revoke", rows[0]["id"],
                                        "--state", str(state)])
    assert revoked.exit_code == 0 and TokenFile(state / TOKENS_FILE).check(token) is None


# -- enrollment over HTTPS -----------------------------------------------------------------


async def test_enrollment_over_https_each_refusal(harness, api_factory, tmp_path: Path) -> None:
    """`fedge enroll --coordinator https://...`: the HTTP API enrolls with the gRPC port's own
    checks; the device then fetches with its new certificate. Every refusal spends nothing."""
    h, _ = harness
    api = api_factory("mtls")
    ca = h.paths.ca_cert.read_bytes()
    issued = h.tokens.create(ttl_s=600, uses=1, label="https")
    devices_before = len(h.store.list_devices())

    def calls() -> None:
        creds = enroll(api.url, issued.token, ca, data_dir=tmp_path / "dev", name="over-https")
        assert creds.device_port == h.service.device_port and creds.coordinator_host == "127.0.0.1"
        assert len(h.store.list_devices()) == devices_before + 1
        device = InferenceDevice(api.url, tmp_path / "dev", fmt="onnx",
                                 ssl_context=device_ssl_context(tmp_path / "dev"))
        assert device.check_once().outcome == "installed"
        # the token had one use: spent, refused alike to a wrong one; no device, no spent use
        for token in (issued.token, issued.token[:-2] + "xx"):
            with pytest.raises(EnrollError) as e:
                enroll(api.url, token, ca, data_dir=tmp_path / f"again-{token[-2:]}")
            assert e.value.code == "UNAUTHENTICATED" and "HTTP 401" in str(e.value)
            assert token not in str(e.value)
        with api.client() as anonymous:
            r = anonymous.post("/v1/enroll", content=b"\xff\xff not protobuf",
                               headers={"Content-Type": "application/x-protobuf"})
            assert r.status_code == 400 and r.json()["error"] == "bad_request"
            r = anonymous.post("/v1/enroll", content=b"x" * (64 * 1024 + 1))
            assert r.status_code == 413
        # a CA that is not the coordinator's: the device refuses the server before sending
        other = tmp_path / "other-ca"
        from fedge.server.tls import ensure_server_tls

        fresh = h.tokens.create(ttl_s=600, label="https-other")
        with pytest.raises(EnrollError) as e:
            enroll(api.url, fresh.token, ensure_server_tls(other).ca_cert.read_bytes(),
                   data_dir=tmp_path / "wrong-ca")
        assert e.value.code == "UNAVAILABLE"
        # a token never travels over plain http
        with pytest.raises(EnrollError, match="https://"):
            enroll(api.url.replace("https", "http"), fresh.token, ca, data_dir=tmp_path / "p")
        assert len(h.store.list_devices()) == devices_before + 1
        assert h.token_uses()[fresh.id] == 0

    await asyncio.to_thread(calls)


async def test_enrollment_over_http_is_refused_and_limited(harness, api_factory,
                                                           tmp_path: Path) -> None:
    h, state = harness
    issued = h.tokens.create(ttl_s=600, label="plain")
    request = EnrollRequest(token=issued.token, csr_pem=csr_pem(p256_key()))
    plain = api_factory("none")  # no TLS: the token would travel in plaintext
    limited = api_factory("token", Enroller(h.store, h.paths, device_port=1, tokens=h.tokens,
                                            limiter=RateLimiter(per_source=1, total=10)))

    def calls() -> None:
        with plain.client() as client:
            r = client.post("/v1/enroll", content=request.SerializeToString())
            assert r.status_code == 403 and r.json()["error"] == "needs_https"
            assert "--http-auth" in r.json()["detail"]
        with limited.client() as client:
            bad = EnrollRequest(token=issued.token, csr_pem=b"not a csr")
            r = client.post("/v1/enroll", content=bad.SerializeToString())
            assert r.status_code == 400 and r.json()["error"] == "invalid_argument"
            r = client.post("/v1/enroll", content=request.SerializeToString())
            assert r.status_code == 429 and r.json()["error"] == "resource_exhausted"
        assert h.token_uses()[issued.id] == 0  # nothing was spent

    await asyncio.to_thread(calls)
    bare = HttpServer(make_http_app(state.registry, Metrics()))
    bare.start()
    try:
        r = httpx.post(f"http://127.0.0.1:{bare.port}/v1/enroll", timeout=10)
        assert r.status_code == 404 and r.json()["error"] == "no_enrollment"
    finally:
        bare.stop()
