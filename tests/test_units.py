"""Durations and sizes as operators write them."""

from __future__ import annotations

import pytest

from gateway.units import parse_duration, parse_size


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("15m", 900), ("8h", 28800), ("250ms", 0.25), ("1d", 86400), ("1.5h", 5400),
])
def test_durations_take_a_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [
    ("10MB", 10_000_000), ("512KiB", 524_288), ("1GiB", 1024**3), ("2048", 2048), (4096, 4096),
    ("1 gb", 1_000_000_000),
])
def test_sizes_take_bytes_or_a_unit(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("value", ["10", "5 parsecs", "", "-5s", 10, None])
def test_durations_without_a_unit_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(value)
