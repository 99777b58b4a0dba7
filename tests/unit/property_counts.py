"""Counts of property-test cases run per codec, written at session end (tests/conftest.py) when
HVDQ_PROPERTY_COUNTS names a file; read by launch/reliability_report.py."""

from collections import Counter

COUNTS: Counter[str] = Counter()


def record(codec: str) -> None:
    COUNTS[codec] += 1
