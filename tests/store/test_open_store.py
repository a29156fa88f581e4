"""open_store: which URLs and paths open which store, and the errors for the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from perps_indexer.errors import StoreError
from perps_indexer.store import SQLiteStore, open_store
from tests.store.conftest import deposits


def check_works(store: object, path: str) -> None:
    assert isinstance(store, SQLiteStore)
    with store:
        assert store.path == path
        assert path == ":memory:" or Path(path).exists()
        store.append(deposits(3))
        assert [ev.seq for ev in store.read()] == [1, 2, 3]


def test_a_plain_path(tmp_path: Path) -> None:
    path = str(tmp_path / "plain.db")
    check_works(open_store(path), path)


def test_sqlite_urls_relative_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    check_works(open_store("sqlite:///relative.db"), "relative.db")
    assert (tmp_path / "relative.db").exists()
    absolute = str(tmp_path / "absolute.db")
    check_works(open_store("sqlite:///" + absolute), absolute)


@pytest.mark.parametrize("spec", [":memory:", "sqlite://", "sqlite:///:memory:"])
def test_in_memory(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    check_works(open_store(spec), ":memory:")
    assert list(tmp_path.iterdir()) == []


def test_synchronous_option(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path}/a.db?synchronous=normal") as store:
        assert isinstance(store, SQLiteStore)
        assert store.synchronous == "NORMAL"
    with open_store(f"sqlite:///{tmp_path}/a.db") as store:
        assert isinstance(store, SQLiteStore)
        assert store.synchronous == "FULL"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("postgresql://user@localhost/perps", r"postgresql:// is not supported yet \(PostgreSQL"),
        ("postgres://localhost/perps", "PostgreSQL support is planned"),
        ("mysql://localhost/perps", r"unknown store URL scheme 'mysql'.*postgresql:// is planned"),
        ("sqlite://somehost/x.db", "a SQLite URL has no host"),
        ("sqlite:///x.db?cache=shared", "unknown or repeated option 'cache'"),
        ("sqlite:///x.db?synchronous=FULL&synchronous=NORMAL", "repeated option 'synchronous'"),
        ("sqlite:///x.db?synchronous=OFF", "synchronous must be one of EXTRA, FULL, NORMAL"),
        ("", "empty store path"),
    ],
)
def test_errors(spec: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match=message):
        open_store(spec)
    assert list(tmp_path.iterdir()) == []
