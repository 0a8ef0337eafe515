"""Pure rules: name escaping, size spreading, archive dates, inode numbers, sizes on the command line."""

from __future__ import annotations

import pytest

from nbiafs import naming
from nbiafs.catalog import spread_sizes
from nbiafs.config import parse_size
from nbiafs.filesystem import archive_time, inode

AWKWARD = ["", ".", "..", "a/b", "/", "50%", "%2F", "x\0y", "café A", "\udc80z", "...", "ab\uf7ffc",
           "lower case", "UPPER", "tab\there", "%"]


@pytest.mark.parametrize("value", AWKWARD)
def test_escape_gives_a_valid_component_and_reverses(value):
    name = naming.escape(value)
    assert name not in ("", ".", "..") and "/" not in name and "\0" not in name
    name.encode("utf-8")  # strict UTF-8, as the kernel path will be decoded
    assert naming.unescape(name) == value


@pytest.mark.parametrize("value", ["a" * 300, "é" * 200, "/" * 100, "1.2." * 80])
def test_long_names_are_cut_uniquely_and_stably(value):
    name = naming.escape(value)
    assert len(name.encode("utf-8")) <= 255 and "/" not in name
    assert naming.escape(value) == name != naming.escape(value + "x")
    assert len(naming.instance_file_name(value).encode("utf-8")) <= 255


def test_escape_is_injective_and_keeps_ordinary_ids():
    names = [naming.escape(v) for v in AWKWARD]
    assert len(set(names)) == len(names)
    assert naming.escape("LIDC-IDRI-0001") == "LIDC-IDRI-0001"
    assert naming.escape("phantom 003 b") == "phantom 003 b"
    assert naming.escape("1.2.840.113619.2.55") == "1.2.840.113619.2.55"


def test_spread_sizes_adds_up_exactly():
    sops = [f"1.{i}" for i in range(7)]
    sizes = spread_sizes(sops, 1000, {})
    assert sum(s for s, _ in sizes.values()) == 1000 and not any(e for _, e in sizes.values())
    assert {s for s, _ in sizes.values()} == {142, 143}
    exact = {"1.0": 150, "1.3": 140}
    sizes = spread_sizes(sops, 1000, exact)
    assert sum(s for s, _ in sizes.values()) == 1000
    assert sizes["1.0"] == (150, True) and sizes["1.1"][1] is False


def test_spread_sizes_never_negative():
    assert spread_sizes(["a", "b"], 10, {"a": 50}) == {"a": (50, True), "b": (0, False)}


def test_archive_dates():
    assert archive_time("2015-05-27 17:12:21.0") == 1432746741.0
    assert archive_time("2015-05-27") == archive_time("05-27-2015")
    assert archive_time("garbage") is None and archive_time(None) is None


def test_inodes_are_stable_and_positive():
    assert inode("/A/B") == inode("/A/B") != inode("/A/C")
    assert 0 < inode("/") < 2 ** 63


@pytest.mark.parametrize("text,value", [("500M", 500 * 2 ** 20), ("2G", 2 * 2 ** 30), ("10GiB", 10 * 2 ** 30),
                                        ("1.5G", int(1.5 * 2 ** 30)), ("4096", 4096), ("1k", 1024)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "0", "-1G", "12Q", "lots", "1.2.3G"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)
