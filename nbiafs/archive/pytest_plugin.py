"""pytest fixtures for the local archive. Enable with `pytest_plugins = ["nbiafs.archive.pytest_plugin"]`.

- `nbia_archive_server`: one `LocalArchive` (spec "test") per test session, on a free port,
  serving API v4 only, as TCIA's production server does today (v1/v2 answer 404).
- `nbia_archive`: the same server for one test, with faults cleared, counters reset and
  token lifetimes and versions restored before and after it, so tests can flip them freely.
- `nbia_archive_legacy`: `nbia_archive` also serving v1 and v2 (with their token session).
- `nbia_archive_factory`: start extra servers with other specs or settings (`versions=`, v4 only
  by default); stopped after the test.
"""

from __future__ import annotations

import pytest

from nbiafs.archive.content import load_synthetic
from nbiafs.archive.server import VERSIONS, LocalArchive
from nbiafs.archive.tokens import TokenStore


@pytest.fixture(scope="session")
def nbia_archive_data(tmp_path_factory):
    return tmp_path_factory.mktemp("nbia-archive-data")


DEFAULT_VERSIONS = ("v4",)


@pytest.fixture(scope="session")
def nbia_archive_server(nbia_archive_data):
    archive = LocalArchive(load_synthetic("test", nbia_archive_data), versions=DEFAULT_VERSIONS).start()
    yield archive
    archive.stop()


def _reset(archive: LocalArchive) -> None:
    archive.clear_faults()
    archive.reset_counters()
    archive.tokens.access_lifetime_s = archive.tokens.refresh_lifetime_s = 7200.0
    archive.set_versions(*DEFAULT_VERSIONS)


@pytest.fixture
def nbia_archive(nbia_archive_server):
    _reset(nbia_archive_server)
    yield nbia_archive_server
    _reset(nbia_archive_server)


@pytest.fixture
def nbia_archive_legacy(nbia_archive):
    nbia_archive.set_versions(*VERSIONS)
    yield nbia_archive


@pytest.fixture
def nbia_archive_factory(nbia_archive_data):
    started = []

    def start(spec="test", users=None, access_lifetime_s=7200.0, refresh_lifetime_s=7200.0,
              versions=DEFAULT_VERSIONS, **kw) -> LocalArchive:
        tokens = TokenStore(users, access_lifetime_s, refresh_lifetime_s)
        archive = LocalArchive(load_synthetic(spec, nbia_archive_data), tokens, versions=versions, **kw).start()
        started.append(archive)
        return archive

    yield start
    for archive in started:
        archive.stop()
