"""hvdquant.kernels: the arithmetic of every scheme, once per device.

- :mod:`.key`      — :class:`DitherKey`, the (seed, step, tensor id, sender) key of the dither stream;
- :mod:`.arith`    — scalar and block functions written once, one builder module per scheme (Philox
  and the dither streams, buckets, packing, summable fields, DQSG and its fused passes, nested,
  QSGD/1-bit);
- :mod:`.table`    — the one list of kernels: name, the arith builder that defines it, its loop kind;
- :mod:`.cpu`      — every kernel of the table compiled with ``numba.njit`` and looped with ``prange``;
- :mod:`.cuda`     — the same kernels compiled with ``numba.cuda.jit`` (imported lazily);
- :mod:`.dispatch` — target choice by device, launches (by table entry), argument checks;
- :mod:`.ops`      — the public API over torch tensors (with :mod:`.ops_packing`, :mod:`.ops_fields`,
  :mod:`.ops_entropy`, and :mod:`.ops_segments`: several tensors in one launch, :mod:`.segments`);
- :mod:`.sizes`    — pure sizing functions of the payload layouts (buckets, packed bytes, cosets);
- :mod:`.jit`      — ``njit`` with Numba's disk cache where one is writable (:mod:`.cpu`, :mod:`.elias`).

This folder sits at ``kernels/`` in the checkout and installs as ``hvdquant.kernels``
(setup.cfg ``package_dir``), so it cannot collide with another distribution's ``kernels``.
"""

from .key import DitherKey, tensor_id

__all__ = ["DitherKey", "tensor_id"]
