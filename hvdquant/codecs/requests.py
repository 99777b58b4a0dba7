"""The typed recovery requests of nested decoding (the protocol: :mod:`hvdquant.codecs.recovery`).

A receiver asks a nested sender, for each of its failed buckets, either the next stage of the
bucket's syndromes or the bucket whole. Requests never travel: every rank derives the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SyndromeRequest:
    """Bucket ``bucket``'s syndromes of locating stage ``stage`` (those it was not sent before)."""

    bucket: int
    stage: int


@dataclass(frozen=True)
class WholeBucket:
    """Bucket ``bucket``'s DQSG(s₁) symbols, all of them."""

    bucket: int


Request = SyndromeRequest | WholeBucket
