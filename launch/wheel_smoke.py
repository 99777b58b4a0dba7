"""Checks of an installed hvdquant wheel, run by launch/check_wheel.sh (see there). Each subcommand
exits non-zero with a message on the first failure and prints one summary line when it passes.

    wheel_smoke.py contents WHEEL SRC      the wheel holds exactly SRC's hvdquant/ and kernels/ files,
                                           kernels/ as hvdquant/kernels/, and nothing else
    wheel_smoke.py imports --venv PREFIX --main-site DIR --checkout DIR
                                           hvdquant comes from PREFIX, not the editable install;
                                           every name of __all__ and every module imports
    wheel_smoke.py roundtrip --cache intree|user|none [--hit]
                                           one DQSG encode/decode, error within Δ/2; Numba's cache is in
                                           the package's __pycache__ or the user cache (and was loaded),
                                          or nowhere writable (compiled in memory)
    wheel_smoke.py summary JSON --ranks P [--min-accuracy A | --max-loss L]
                                           the training run's summary is sane
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import pkgutil
import sys
import zipfile
from pathlib import Path


def fail(msg: str) -> None:
    raise SystemExit(f"wheel_smoke: FAIL: {msg}")


def inside(path: str | Path, folder: str | Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


# ----------------------------------------------------------------------------- wheel contents
def contents(wheel: Path, src: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        meta = {n: z.read(n).decode() for n in names if n.split("/")[0].endswith(".dist-info")}
    dist_info = {n.split("/")[0] for n in meta}
    if len(dist_info) != 1:
        fail(f"expected one .dist-info folder in {wheel.name}, found {sorted(dist_info)}")
    files = {n for n in names if n not in meta}
    # Expected: every file under hvdquant/ and kernels/ (kernels/ installs as hvdquant/kernels/).
    expected = set()
    for folder, target in (("hvdquant", "hvdquant"), ("kernels", "hvdquant/kernels")):
        for p in (src / folder).rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"):
                expected.add(f"{target}/{p.relative_to(src / folder).as_posix()}")
    missing, extra = sorted(expected - files), sorted(files - expected)
    if missing:
        hint = ("a package was not discovered: see package_dir in setup.cfg" if any(m.endswith(".py") for m in missing)
                else "a data file needs package_data in setup.cfg")
        fail(f"{len(missing)} file(s) of the checkout missing from {wheel.name} ({hint}): {missing}")
    if extra:
        fail(f"{wheel.name} holds file(s) that are not in hvdquant/ or kernels/: {extra}")
    top = sorted({n.split("/")[0] for n in files})
    if top != ["hvdquant"]:
        fail(f"top-level entries besides hvdquant: {top}")
    top_level = next((t for n, t in meta.items() if n.endswith("/top_level.txt")), "hvdquant\n")
    if top_level.split() != ["hvdquant"]:
        fail(f"top_level.txt lists {top_level.split()}, expected only hvdquant")
    entry_points = next((t for n, t in meta.items() if n.endswith("/entry_points.txt")), "")
    if "hvdquant-train = hvdquant.examples.train:main" not in entry_points:
        fail(f"console script hvdquant-train missing from entry_points.txt: {entry_points!r}")
    packages = sorted({str(Path(n).parent).replace("/", ".") for n in files if n.endswith(".py")})
    print(f"wheel contents ok: {len(files)} files, {len(packages)} packages: {', '.join(packages)}")


# ----------------------------------------------------------------------------- imports
def imports(venv: Path, main_site: Path, checkout: Path) -> None:
    if inside(Path.cwd(), checkout):
        fail(f"run from outside the checkout, not from {Path.cwd()}")
    if not inside(sys.prefix, venv) or not inside(venv, sys.prefix):
        fail(f"sys.prefix is {sys.prefix}, expected the throw-away venv {venv}")
    if not any(p and Path(p).resolve() == main_site.resolve() for p in sys.path):
        fail(f"the main venv's site-packages {main_site} is not on sys.path: {sys.path}")

    import hvdquant

    if not inside(hvdquant.__file__, venv):
        fail(f"hvdquant imported from {hvdquant.__file__}, not from the wheel installed in {venv}")
    # The editable install's finder lives in the main site-packages, started by a .pth file there;
    # that folder is on sys.path through a .pth line, whose own .pth files Python does not run.
    editable = [m for m in sys.modules if m.startswith("__editable__")]
    editable += [repr(f) for f in sys.meta_path if "editable" in type(f).__module__]
    if editable:
        fail(f"the editable install's finder is active: {editable}")
    for name in hvdquant.__all__:
        obj = getattr(hvdquant, name)  # Compression and DistributedOptimizer are lazy (import Horovod)
        mod = sys.modules.get(getattr(obj, "__module__", None) or "")
        if mod is not None and mod.__name__.startswith("hvdquant") and not inside(mod.__file__, venv):
            fail(f"hvdquant.{name} comes from {mod.__file__}, outside {venv}")

    def onerror(name: str) -> None:
        fail(f"could not import package {name}: {sys.exc_info()[1]!r}")

    modules = [m.name for m in pkgutil.walk_packages(hvdquant.__path__, "hvdquant.", onerror=onerror)]
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - report which module
            fail(f"import {name}: {e!r}")
        if not inside(mod.__file__, venv):
            fail(f"{name} imported from {mod.__file__}, outside {venv}")
    for public in ("hvdquant.kernels.cuda", "hvdquant.ddp"):  # hvdquant.ddp: the README's `import hvdquant.ddp`
        if public not in modules:
            fail(f"{public} not found among the installed modules: {modules}")
    print(f"imports ok: hvdquant {hvdquant.__version__} from {Path(hvdquant.__file__).parent}; "
          f"{len(hvdquant.__all__)} names of __all__ and {len(modules)} modules imported; no editable finder")


# ----------------------------------------------------------------------------- codec round trip
def roundtrip(cache: str, hit: bool) -> None:
    import time

    import torch

    import hvdquant
    from hvdquant.codecs import TensorContext
    from hvdquant.kernels import cpu, tensor_id
    from hvdquant.kernels.threads import RANGE_COST, SERIAL_BELOW

    codec = hvdquant.DQSG(levels=1, bucket_size=512)
    n = 5 * 512 + 77  # a partial last bucket; magnitudes differ by 4 orders between buckets
    g = torch.randn(n, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, n)
    name = "smoke.weight"
    ctx = TensorContext(name, (n,), hvdquant.DitherKey(20240601, 7, tensor_id(name), 0), ranks=1)
    t0 = time.perf_counter()
    enc = codec.encode(g, ctx)
    dec = codec.decode(enc, ctx)
    seconds = time.perf_counter() - t0
    again = codec.decode(codec.from_bytes(enc.to_bytes(), n, ctx), ctx)
    if dec.shape != (n,) or dec.dtype != torch.float32:
        fail(f"decode gave {tuple(dec.shape)} {dec.dtype}, expected ({n},) float32")
    if not torch.equal(dec, again):
        fail("decoding the payload's bytes differs from decoding the payload")
    if enc.nbytes() * 8 != round(codec.formula_bits(n, ctx) * n):
        fail(f"payload of {enc.nbytes()} bytes, the formula says {codec.formula_bits(n, ctx) * n / 8}")
    # Δ_b = max_b |g| / s; the reconstruction error of every coordinate is within Δ_b / 2.
    pad = torch.zeros(codec.num_buckets(n) * 512)
    pad[:n] = g.abs()
    delta = (pad.view(-1, 512).amax(1) / codec.levels).repeat_interleave(512)[:n]
    ratio = ((dec - g).abs() / delta).max().item()
    if not ratio <= 0.5 * (1 + 1e-5):
        fail(f"reconstruction error reaches {ratio:.6f} Δ, more than Δ/2")
    if ratio < 0.4:
        fail(f"reconstruction error at most {ratio:.3f} Δ: not a dithered quantizer's uniform error")

    # Where Numba keeps the compiled kernels: the installed package's __pycache__ when it is writable,
    # else the user cache (~/.cache/numba or $XDG_CACHE_HOME/numba), else nothing is cached.
    # The kernel this round trip ran: below kernels.threads.SERIAL_BELOW units of work (a Philox
    # kernel's element counts RANGE_COST units), the serial twin.
    kernel = cpu.serial.dqsg_encode_packed if n * RANGE_COST < SERIAL_BELOW else cpu.parallel.dqsg_encode_packed
    if cache == "none":  # no writable place: compiled without a disk cache, same results
        if type(kernel._cache).__name__ != "NullCache":
            fail(f"cpu.{kernel.__name__} has a disk cache ({type(kernel._cache).__name__}) with none writable")
        print(f"round trip ok: DQSG(s=1, d=512) on {n} coordinates, max error {ratio:.4f} Δ (bound 0.5), "
              f"{seconds:.1f} s; no writable Numba cache: kernels compiled in memory")
        return
    locator = type(kernel._cache._impl.locator).__name__
    path = Path(kernel._cache._cache_path)
    pkg = Path(cpu.__file__).parent
    where = "intree" if inside(path, pkg) else "user" if locator == "UserWideCacheLocator" else locator
    if cache != where:
        fail(f"Numba cache in {path} ({locator}), expected the {cache} cache")
    index = sorted(path.glob(f"cpu.{kernel.__name__}-*.nbi"))
    if not index:
        found = sorted(p.name for p in path.glob("*"))
        fail(f"Numba wrote no cache index for cpu.{kernel.__name__} in {path}: {found}")
    hits, misses = sum(kernel.stats.cache_hits.values()), sum(kernel.stats.cache_misses.values())
    if hit and (not hits or misses):
        fail(f"cpu.{kernel.__name__} was compiled again ({hits} cache hits, {misses} misses), not loaded from {path}")
    print(f"round trip ok: DQSG(s=1, d=512) on {n} coordinates, max error {ratio:.4f} Δ (bound 0.5), "
          f"{enc.nbytes()} bytes, {seconds:.1f} s; Numba cache {where} ({'loaded' if hits else 'compiled'}): {path}")


# ----------------------------------------------------------------------------- training summary
def summary(path: Path, ranks: int, min_accuracy: float, max_loss: float | None = None) -> None:
    """A training run's summary: its rank count, identical replicas, compressed gradients, and the
    test accuracy (CNN job) at least ``min_accuracy`` or the validation loss (LM job, ``max_loss``
    given) at most ``max_loss``."""
    if not path.is_file():
        fail(f"the training run wrote no summary at {path}")
    s = json.loads(path.read_text())
    if s.get("ranks") != ranks:
        fail(f"summary says {s.get('ranks')} ranks, expected {ranks}")
    if s.get("replicas_bit_identical") is not True:
        fail("replicas are not bit-identical after training")
    bits = s.get("bits_per_coordinate", 0.0)
    if max_loss is None:
        quality = s.get("test_accuracy", 0.0)
        if not quality >= min_accuracy:  # 10 classes: chance is 0.1; 30 steps of 2 x 64 images reach ~0.7
            fail(f"test accuracy {quality} after training, below {min_accuracy}")
        shown = f"test accuracy {quality:.4f}"
    else:
        quality = s.get("validation_loss", math.inf)
        if not quality <= max_loss:  # a uniform byte scores ln 256 = 5.55
            fail(f"validation loss {quality} after training, above {max_loss}")
        shown = f"validation loss {quality:.4f}"
    if not 0.0 < bits < 8.0:
        fail(f"{bits} bits per coordinate handed to the allreduce: the gradients were not compressed")
    print(f"training ok: {ranks} ranks, {shown}, {bits:.3f} bits/coordinate, "
          f"replicas bit-identical, {s.get('seconds', 0):.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("contents")
    c.add_argument("wheel", type=Path)
    c.add_argument("src", type=Path)
    i = sub.add_parser("imports")
    i.add_argument("--venv", type=Path, required=True)
    i.add_argument("--main-site", type=Path, required=True)
    i.add_argument("--checkout", type=Path, required=True)
    r = sub.add_parser("roundtrip")
    r.add_argument("--cache", choices=["intree", "user", "none"], required=True)
    r.add_argument("--hit", action="store_true", help="the kernels must come from the cache, not be compiled")
    s = sub.add_parser("summary")
    s.add_argument("json", type=Path)
    s.add_argument("--ranks", type=int, required=True)
    s.add_argument("--min-accuracy", type=float, default=0.3, help="CNN job: lowest test accuracy accepted")
    s.add_argument("--max-loss", type=float, default=None, help="LM job: highest validation loss accepted")
    a = p.parse_args()
    if a.cmd == "contents":
        contents(a.wheel, a.src)
    elif a.cmd == "imports":
        imports(a.venv, a.main_site, a.checkout)
    elif a.cmd == "roundtrip":
        roundtrip(a.cache, a.hit)
    else:
        summary(a.json, a.ranks, a.min_accuracy, a.max_loss)


if __name__ == "__main__":
    main()
