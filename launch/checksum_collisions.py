"""How often a failed nested bucket slips past its checksum (a measurement, not a test).

    .venv/bin/python launch/checksum_collisions.py --buckets 200000

A nested decode that fails leaves an error e = k − K̂ on some coordinates of a bucket, each entry a
nonzero multiple of ρ; the bucket is caught when Σ_j w_j·e_j ≢ 0 mod 2^32. This script draws error
patterns of three families and counts the ones that cancel, for hvdquant's checksum
(:func:`hvdquant.kernels.ops.bucket_checksum`: odd hashed weights w_j) and, for comparison, for the
arithmetic weights w_j = 2j + 1:

- ``dense``: each coordinate wrong with probability 1–40% (six levels), by ±ρ or ±2ρ;
- ``few``: 2–8 wrong coordinates at random positions, by ±ρ;
- ``runs``: a run of 2–16 adjacent wrong coordinates with random signs, by ±ρ (failures follow
  the largest |g − y|, which often sit together).

Writes JSON; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import torch

from hvdquant.kernels import ops

MASK32 = 0xFFFFFFFF


def patterns(family: str, count: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` error patterns (rows of d multipliers m, e = m·ρ), each with a nonzero entry."""
    if family == "dense":
        frac = torch.tensor([0.01, 0.02, 0.05, 0.1, 0.2, 0.4])[torch.arange(count) % 6][:, None]
        hit = torch.rand(count, d, generator=gen) < frac
        size = torch.randint(1, 3, (count, d), generator=gen)
    elif family == "few":
        wrong = torch.randint(2, 9, (count, 1), generator=gen)
        rank = torch.rand(count, d, generator=gen).argsort(1).argsort(1)
        hit, size = rank < wrong, torch.ones(count, d, dtype=torch.int64)
    elif family == "runs":
        length = torch.randint(2, 17, (count, 1), generator=gen)
        start = (torch.rand(count, 1, generator=gen) * (d - length + 1)).long()
        pos = torch.arange(d)[None, :]
        hit, size = (pos >= start) & (pos < start + length), torch.ones(count, d, dtype=torch.int64)
    else:
        raise ValueError(f"unknown family {family!r}")
    sign = 2 * torch.randint(0, 2, (count, d), generator=gen) - 1
    m = hit * size * sign
    m[~hit.any(1), 0] = 1
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--buckets", type=int, default=200_000, help="patterns per family and ρ")
    p.add_argument("--rhos", nargs="+", type=int, default=[2, 3, 4, 16])
    p.add_argument("--bucket-size", type=int, default=512)
    p.add_argument("--chunk", type=int, default=20_000)
    p.add_argument("--out", type=Path, default=Path("runs/checksum_collisions"))
    args = p.parse_args()
    d = args.bucket_size
    arithmetic = 2 * torch.arange(d, dtype=torch.int64) + 1
    rows = []
    for family in ("dense", "few", "runs"):
        for rho in args.rhos:
            gen = torch.Generator().manual_seed(rho * 1000 + len(family))
            missed = {"hashed": 0, "arithmetic": 0}
            done = 0
            while done < args.buckets:
                n = min(args.chunk, args.buckets - done)
                e = patterns(family, n, d, gen) * rho
                hashed = ops.bucket_checksum(e.to(torch.int32).reshape(-1).contiguous(), d)
                missed["hashed"] += int((hashed == 0).sum())
                missed["arithmetic"] += int((((e * arithmetic).sum(1) & MASK32) == 0).sum())
                done += n
            rows.append({"family": family, "rho": rho, "buckets": args.buckets, **missed})
            print(f"{family} ρ={rho}: {missed}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"date": date.today().isoformat(), "bucket_size": d, "rows": rows}
    (args.out / "checksum_collisions.json").write_text(json.dumps(result, indent=1))
    print("\n| family | ρ | failed buckets | undetected, hashed w_j | undetected, w_j = 2j+1 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['rho']} | {r['buckets']:,} | {r['hashed']} | {r['arithmetic']} |")


if __name__ == "__main__":
    main()
