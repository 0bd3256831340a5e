"""Security edges: Flower's unauthenticated endpoints, and certificate checks on every Redis client.

Flower serves /metrics and /healthcheck without its basic auth (README, "Flower"): this test pins
that hazard on a real Flower, so the README's advice (keep the port private) stays true.
Every Redis client vmqueue makes verifies a rediss:// server's certificate unless the user opts
out with VMQ_REDIS_SSL_CERT_REQS=none: proved against a real TLS redis-server whose certificate
no trust store knows (refused), the same with it trusted (accepted), and with the opt-out.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bench.harness import free_port
from bench.probes import Flower, wait_for
from vmqueue.settings import Settings


@pytest.mark.system
def test_flower_metrics_answer_without_auth_while_the_ui_needs_it(test_env, tmp_path):
    flower = Flower(test_env, tmp_path).wait_ready()
    try:
        assert flower.get("/", auth=False).status_code == 401
        assert flower.get("/api/tasks", auth=False).status_code == 401
        assert flower.get("/", auth=True).status_code == 200
        # The documented hazard: these two answer anyone who reaches the port.
        metrics = flower.get("/metrics", auth=False)
        assert metrics.status_code == 200 and "flower_" in metrics.text
        assert flower.get("/healthcheck", auth=False).status_code == 200
    finally:
        flower.stop()


# -- rediss:// ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A redis-server answering TLS only, with a self-signed certificate; yields (url, cert)."""
    if not shutil.which("openssl") or not shutil.which("redis-server"):
        pytest.skip("openssl and redis-server are needed")
    workdir = tmp_path_factory.mktemp("tls")
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0"
    try:
        trusting = redis.Redis.from_url(url, ssl_ca_certs=str(cert), socket_connect_timeout=1)
        wait_for(lambda: _pings(trusting), 10, "TLS redis-server start", every_s=0.1)
        yield url, cert
    finally:
        server.terminate()
        server.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _job_store(settings: Settings) -> None:
    from vmqueue.connection import connect

    client = connect(settings)
    client.set_retry(Retry(NoBackoff(), 0))  # a refused certificate is final; don't ride it out
    client.ping()


def _rate_limit(settings: Settings) -> None:
    from vmqueue.connection import connect
    from workers.calls import SharedRateLimit

    client = connect(settings)
    client.set_retry(Retry(NoBackoff(), 0))  # a refused certificate is final; don't ride it out
    SharedRateLimit(settings, client).acquire("sim")


def _broker(settings: Settings) -> None:
    from vmqueue.celery_config import make_celery

    connection = make_celery(settings).connection_for_write()
    try:
        connection.ensure_connection(max_retries=1)
        connection.default_channel.client.ping()
    finally:
        connection.release()


def _flower_broker(settings: Settings) -> None:
    # Flower reads queue lengths with a Redis client of its own, built from the app's broker_use_ssl.
    from flower.utils.broker import Broker

    from vmqueue.celery_config import make_celery

    broker = Broker(settings.redis_url, broker_use_ssl=make_celery(settings).conf.broker_use_ssl)
    asyncio.run(broker.redis.ping())  # an asyncio client


# The simulated cloud, the workers' job store and the producer all connect through vmqueue.jobstore.connect.
CLIENTS: dict[str, Callable[[Settings], None]] = {
    "job store": _job_store,
    "rate limit": _rate_limit,
    "broker": _broker,
    "flower queue lengths": _flower_broker,
}


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_rediss_refuses_an_unknown_certificate_by_default(tls_redis, client):
    url, _ = tls_redis
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        CLIENTS[client](Settings(redis_url=url))


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_rediss_accepts_a_trusted_certificate(tls_redis, client, monkeypatch):
    url, cert = tls_redis
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the default trust store now holds our CA
    CLIENTS[client](Settings(redis_url=url))


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_rediss_opt_out_skips_the_check(tls_redis, client):
    url, _ = tls_redis
    CLIENTS[client](Settings(redis_url=url, redis_ssl_cert_reqs="none"))


def test_a_misspelt_opt_out_is_refused():
    from vmqueue.connection import redis_ssl_options

    with pytest.raises(ValueError, match="VMQ_REDIS_SSL_CERT_REQS"):
        redis_ssl_options(Settings(redis_url="rediss://127.0.0.1:1/0", redis_ssl_cert_reqs="off"))
