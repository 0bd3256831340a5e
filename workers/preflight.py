"""Preflight: can this process serve a provider's queue? ``vmq check`` and every worker's start ask.

Checks, in order, each saying exactly what to install or set when it fails:

1. settings: the ``VMQ_*`` environment parses (``Settings``), the provider's rate limit too;
2. redis: ``REDIS_URL`` answers a PING within seconds;
3. sdk: the adapter and its SDK import (else ``pip install 'vmqueue[<provider>]'``);
4. credentials: one read-only call, the list of VMs vmqueue owns there (``list_owned_vms``, what
   the sweeper reads); refused credentials fail with the adapter's own message, which names the
   variables to set (README, "Providers").

A worker runs the same checks when it starts (``celeryd_after_setup``, before it consumes) and
exits with status 78 (EX_CONFIG) if settings, Redis, the SDK or the credentials fail, so the jobs
stay queued for a worker that can serve them. Any other error of the read (the API unreachable, a
5xx) is logged as a warning and the worker starts: a cloud's bad minute must not stop its workers.

``python -m workers.preflight --provider NAME [--provider NAME ...]`` prints the report (what
``vmq check`` runs: the producer imports no worker code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass
from importlib import metadata

from celery.signals import celeryd_after_setup

from vmqueue import keys
from vmqueue.models import PROVIDERS

log = logging.getLogger("vmqueue.worker")

EX_CONFIG = 78
# The distribution whose version the report shows, per provider (pyproject.toml's extras).
SDKS = {
    "hetzner": "hcloud",
    "digitalocean": "pydo",
    "aws": "boto3",
    "gcp": "google-cloud-compute",
    "oci": "oci",
    "azure": "azure-mgmt-compute",
}


@dataclass(frozen=True)
class Check:
    name: str  # settings, redis, sdk, credentials
    ok: bool
    detail: str
    fatal: bool = True  # a failure that keeps a worker from consuming (False: a warning)

    def line(self) -> str:
        mark = "ok" if self.ok else ("FAIL" if self.fatal else "WARN")
        return f"  {mark:<5} {self.name:<12} {self.detail}"


def check(provider: str) -> list[Check]:
    """Every check for ``provider``; later checks are skipped once one fails fatally."""
    from pydantic import ValidationError

    from vmqueue.connection import RedisUnavailable, check_redis, redacted_url
    from vmqueue.settings import Settings, rate_limit_for

    results: list[Check] = []
    try:
        settings = Settings()
        from limits import parse

        parse(rate_limit_for(settings, provider))
    except ValidationError as exc:
        problems = "; ".join(f"VMQ_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        return [Check("settings", False, f"{problems}: fix or unset these variables")]
    except ValueError as exc:
        return [Check("settings", False, f"VMQ_RATE_LIMIT for {provider}: {exc}")]
    results.append(Check("settings", True, "VMQ_* settings parse"))

    try:
        check_redis(settings)
    except RedisUnavailable as exc:
        return [*results, Check("redis", False, str(exc))]
    results.append(Check("redis", True, f"{redacted_url(settings.redis_url)} answers"))

    try:
        from workers.providers.registry import PROVIDER_FACTORIES

        importlib.import_module(f"workers.providers.{provider}")
    except ImportError as exc:
        missing = exc.name or str(exc)
        fix = f"pip install 'vmqueue[{provider}]'" if provider in SDKS else "reinstall vmqueue"
        return [*results, Check("sdk", False, f"cannot import {missing}: {fix}")]
    version = f"{SDKS[provider]} {metadata.version(SDKS[provider])}" if provider in SDKS else "built in"
    results.append(Check("sdk", True, version))
    return [*results, *_budget_and_credentials(provider, PROVIDER_FACTORIES[provider], settings)]


def _budget_and_credentials(provider: str, factory, settings) -> list[Check]:
    """The adapter's API budget with this deployment's ``VMQ_BUDGET`` (a bucket it names that the
    profile lacks is fatal: every request of the worker would fail), then its credentials."""
    from workers.budget import Budget

    budget = Budget(settings)
    try:
        adapter = factory()
    except Exception as exc:  # noqa: BLE001 - the adapter's own words on its credentials
        return [_credentials_failed(exc)]
    try:
        profile = budget.profile(provider, getattr(adapter, "budget_profile", None))
    except ValueError as exc:  # VMQ_BUDGET names a bucket the profile lacks, or does not parse
        return [Check("budget", False, f"{exc}: fix or unset VMQ_BUDGET")]
    checks = [Check("budget", True, f"{profile.provider}'s buckets: {', '.join(profile.buckets)}")]
    try:
        # Charged to the shared API budget like every request: uncounted, it left the workers' model of
        # a window one request short (a create refused with 429 when the window filled at start).
        owned = budget.metered(lambda _: adapter)(provider).list_owned_vms()
    except Exception as exc:  # noqa: BLE001
        return [*checks, _credentials_failed(exc)]
    return [*checks, Check("credentials", True, f"accepted: read-only list found {len(owned)} VM(s) vmqueue owns")]


def _credentials_failed(exc: Exception) -> Check:
    from workers.providers.errors import AuthError, ProviderError

    if isinstance(exc, AuthError):
        return Check("credentials", False, f"refused: {exc}")
    if isinstance(exc, ProviderError):
        detail = f"could not verify ({type(exc).__name__}: {exc}); the API may be down"
        return Check("credentials", False, detail, fatal=False)
    # An SDK's own error: report it, do not crash the report.
    return Check("credentials", False, f"could not verify ({type(exc).__name__}: {exc})", fatal=False)


def report(provider: str, checks: list[Check]) -> str:
    return "\n".join([f"{provider}:", *(c.line() for c in checks)])


def passed(checks: list[Check]) -> bool:
    return all(c.ok or not c.fatal for c in checks)


@celeryd_after_setup.connect
def _at_worker_start(sender: str, instance, **_: object) -> None:
    """Refuse to consume when a provider queue this worker would serve fails its checks."""
    queues = instance.app.amqp.queues.consume_from or {}
    providers = [q.removeprefix(keys.QUEUE_PREFIX) for q in queues if q.removeprefix(keys.QUEUE_PREFIX) in PROVIDERS]
    failed = False
    for provider in providers:
        checks = check(provider)
        for c in checks:
            if not c.ok:
                (log.error if c.fatal else log.warning)("preflight %s %s: %s", provider, c.name, c.detail)
        failed = failed or not passed(checks)
    if failed:
        log.error(
            "preflight failed: this worker (%s) will not consume %s; its jobs stay queued for a worker that can "
            "serve them. `vmq check --provider NAME` repeats these checks",
            sender,
            ", ".join(keys.queue_name(p) for p in providers),
        )
        raise SystemExit(EX_CONFIG)
    if providers:
        log.info("preflight passed for %s", ", ".join(providers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmq check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", action="append", choices=PROVIDERS, help="repeatable; default: every provider")
    args = parser.parse_args(argv)
    ok = True
    for provider in args.provider or PROVIDERS:
        checks = check(provider)
        print(report(provider, checks), flush=True)
        ok = ok and all(c.ok for c in checks)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
