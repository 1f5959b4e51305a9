"""Fixtures shared by the end-to-end tests: the real switchdb, and a scripted provider over ws:// and wss://."""
from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from hypothesis import HealthCheck, settings

# Timing is not what a property test checks: on a loaded 2-core machine (two test workers, the perf
# smoke run's processes) an example or a draw can take seconds, which is not a failure.
settings.register_profile("switch", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("switch")

from tests.stack import open_stack
from tests.upstream import scripted_provider


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """The private CA the tests' providers are signed by; switchd trusts it through UPSTREAM_CA_FILE."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def stack(tmp_path: Path, ca_file: Path):
    async with open_stack(tmp_path, UPSTREAM_CA_FILE=str(ca_file)) as s:
        yield s


# Production talks TLS to the provider: every relay test runs over wss:// as well as ws://.
@pytest.fixture(params=["wss", "ws"])
async def provider(request: pytest.FixtureRequest, tls_ca: trustme.CA):
    context = None
    if request.param == "wss":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    async with scripted_provider(context) as p:
        yield p


@pytest.fixture
async def plain_provider():
    """A ws:// provider only, for tests of switchd's client side (the relay runs over both kinds)."""
    async with scripted_provider(None) as p:
        yield p


# The longest test files, started first: `make test` runs two pytest-xdist workers a file at a
# time, and a long file started last would keep one worker busy while the other sits idle.
LONGEST_FIRST = ("test_perf_smoke.py", "test_chaos_pg_e2e.py", "test_journal_e2e.py", "test_ledger_cli.py",
                 "test_switchdb_cli.py", "test_leases_e2e.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept
