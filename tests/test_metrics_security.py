"""The metrics endpoint's security: loopback by default, a bearer token for anything else (checked
on every scrape), HTTPS with a certificate and key. Real HTTP(S) on loopback."""

from __future__ import annotations

import http.client
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import self_signed

from sampa_ray.cli import build_parser, config_from_args
from sampa_ray.config import make_config
from sampa_ray.errors import UserError
from sampa_ray.telemetry.metrics import RunMetrics

TOKEN = "s3cret-t0ken"
FAILED = (urllib.error.URLError, ConnectionError, http.client.HTTPException, ssl.SSLError)


def get(url: str, token: str | None = None, header: str | None = None,
        context: ssl.SSLContext | None = None) -> tuple[int, str]:
    """(status, body) of a GET; an HTTP error status is returned, not raised."""
    req = urllib.request.Request(url)
    if header is not None:
        req.add_header("Authorization", header)
    elif token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        assert err.code != 200
        return err.code, err.read().decode()


@pytest.fixture
def metrics() -> Iterator[RunMetrics]:
    m = RunMetrics()
    m.observe_update(step=3, samples=48, loss=1.25, lr=0.1, grad_norms={"grad": 2.0})
    yield m
    m.shutdown()


def test_no_token_on_loopback_serves_every_scrape(metrics: RunMetrics):
    port = metrics.serve()
    assert metrics.host == "127.0.0.1" and metrics.scheme == "http"
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and "sampa_steps_total 3.0" in body
    status, _ = get(f"http://127.0.0.1:{port}/metrics", token="anything")  # ignored
    assert status == 200


def test_with_a_token_every_scrape_needs_the_bearer_header(metrics: RunMetrics):
    port = metrics.serve("127.0.0.1", 0, token=TOKEN)
    url = f"http://127.0.0.1:{port}/metrics"
    status, body = get(url)
    assert status == 401 and "token" in body
    for wrong in ("wrong", TOKEN[:-1], TOKEN + "x", "", f" {TOKEN}x"):
        assert get(url, token=wrong)[0] == 401, wrong
    for header in (TOKEN, f"Basic {TOKEN}", f"Token {TOKEN}", "Bearer"):
        assert get(url, header=header)[0] == 401, header
    for path in ("/", "/metrics?name[]=sampa_loss", "/anything"):  # not only /metrics
        assert get(f"http://127.0.0.1:{port}{path}")[0] == 401, path
    status, body = get(url, token=TOKEN)
    assert status == 200
    assert "# TYPE sampa_steps_total counter" in body and "sampa_loss 1.25" in body
    assert get(url, header=f"bearer {TOKEN}")[0] == 200  # the scheme is case-insensitive


def test_401_carries_a_bearer_challenge(metrics: RunMetrics):
    port = metrics.serve(token=TOKEN)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        assert r.status == 401
        assert r.getheader("WWW-Authenticate", "").startswith("Bearer")
        assert "sampa_" not in r.read().decode()
    finally:
        conn.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.1", "example.com"])
def test_beyond_loopback_without_a_token_is_refused(metrics: RunMetrics, host: str):
    with pytest.raises(UserError, match=r"^metrics_host: .*requires a token") as err:
        metrics.serve(host, 0)
    assert "\n" not in str(err.value)
    assert metrics.port is None  # nothing was bound
    with pytest.raises(UserError, match="^metrics_host: "):
        metrics.serve(host, 0, token="")  # an empty token is no token


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.0.0.2"])
def test_loopback_names_need_no_token(metrics: RunMetrics, host: str):
    port = metrics.serve(host, 0)
    assert get(f"http://{host}:{port}/metrics")[0] == 200


def test_every_interface_with_a_token_still_checks_it(metrics: RunMetrics):
    port = metrics.serve("0.0.0.0", 0, token=TOKEN)
    assert get(f"http://127.0.0.1:{port}/metrics")[0] == 401
    assert get(f"http://127.0.0.1:{port}/metrics", token=TOKEN)[0] == 200


def test_shutdown_releases_the_port(metrics: RunMetrics):
    port = metrics.serve(token=TOKEN)
    metrics.shutdown()
    with pytest.raises(FAILED):
        get(f"http://127.0.0.1:{port}/metrics", token=TOKEN)
    assert metrics.serve(token=TOKEN) > 0  # can serve again


# -- TLS -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


def client_ctx(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def test_https_with_the_cert_as_ca_and_plain_http_fails(metrics: RunMetrics,
                                                        pem: tuple[Path, Path]):
    cert, key = pem
    port = metrics.serve("127.0.0.1", 0, token=TOKEN, certfile=str(cert), keyfile=str(key))
    assert metrics.scheme == "https"
    https = f"https://127.0.0.1:{port}/metrics"
    status, body = get(https, token=TOKEN, context=client_ctx(cert))
    assert status == 200 and "sampa_loss 1.25" in body
    assert get(https, context=client_ctx(cert))[0] == 401  # TLS does not replace the token
    with pytest.raises(FAILED):
        get(f"http://127.0.0.1:{port}/metrics", token=TOKEN)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        get(https, token=TOKEN, context=ssl.create_default_context())  # not our CA
    # the failed plain request did not wedge the server
    assert get(https, token=TOKEN, context=client_ctx(cert))[0] == 200


def test_https_without_a_token_on_loopback(metrics: RunMetrics, pem: tuple[Path, Path]):
    cert, key = pem
    port = metrics.serve(certfile=str(cert), keyfile=str(key))
    status, body = get(f"https://127.0.0.1:{port}/metrics", context=client_ctx(cert))
    assert status == 200 and "sampa_steps_total" in body


def test_a_stalled_tls_client_does_not_block_other_scrapes(metrics: RunMetrics,
                                                           pem: tuple[Path, Path]):
    """The handshake runs in the request's thread: a client that connects and says nothing
    holds only its own connection."""
    cert, key = pem
    port = metrics.serve(certfile=str(cert), keyfile=str(key))
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        t0 = time.monotonic()
        assert get(f"https://127.0.0.1:{port}/metrics", context=client_ctx(cert))[0] == 200
        assert time.monotonic() - t0 < 5
    finally:
        for s in idle:
            s.close()


def test_bad_tls_files_are_one_line_errors(metrics: RunMetrics, pem: tuple[Path, Path],
                                           tmp_path: Path):
    cert, key = pem
    with pytest.raises(UserError, match=r"^metrics_cert: cannot load certificate"):
        metrics.serve(certfile=str(tmp_path / "missing.pem"), keyfile=str(key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(UserError, match=r"^metrics_cert: cannot load certificate"):
        metrics.serve(certfile=str(garbage), keyfile=str(key))
    with pytest.raises(UserError, match=r"^metrics_cert: cannot load certificate"):
        metrics.serve(certfile=str(cert), keyfile=str(cert))  # no key in it
    with pytest.raises(UserError, match=r"^metrics_key: HTTPS needs both"):
        metrics.serve(certfile=str(cert))
    with pytest.raises(UserError, match=r"^metrics_cert: HTTPS needs both"):
        metrics.serve(keyfile=str(key))
    assert metrics.port is None


# -- configuration ---------------------------------------------------------------------------------
def test_flags_reach_the_config_and_do_not_change_the_hash(tmp_path: Path):
    args = build_parser().parse_args(
        ["train", "--metrics-host", "0.0.0.0", "--metrics-cert", "c.pem", "--metrics-key",
         "k.pem", "--out", str(tmp_path / "o")])
    cfg = config_from_args(args)
    assert (cfg.metrics_host, cfg.metrics_cert, cfg.metrics_key) == ("0.0.0.0", "c.pem",
                                                                     "k.pem")
    assert cfg.hash() == make_config({}).hash()
    with pytest.raises(UserError, match=r"^config: metrics_key: HTTPS needs both"):
        make_config({"metrics_cert": "c.pem"})
    with pytest.raises(UserError, match=r"^config: metrics_cert: HTTPS needs both"):
        make_config({"metrics_key": "k.pem"})
