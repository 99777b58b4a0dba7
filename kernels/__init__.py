"""hvdquant.kernels: the arithmetic of every scheme, once per device.

- :mod:`.key`   — :class:`DitherKey`, the (seed, step, tensor id, sender) key of the dither stream;
- :mod:`.arith` — scalar and block functions (Philox-4x32-10, dithered/nested/QSGD/1-bit codes,
  packing, modular addition, summable fields) written once;
- :mod:`.cpu`   — those functions compiled with ``numba.njit`` and looped with ``prange``;
- :mod:`.cuda`  — the same functions compiled with ``numba.cuda.jit`` (imported lazily);
- :mod:`.ops`   — the public API over torch tensors: checks arguments, dispatches by device;
- :mod:`.jit`   — ``njit`` with Numba's disk cache where one is writable (:mod:`.cpu`, :mod:`.elias`).

This folder sits at ``kernels/`` in the checkout and installs as ``hvdquant.kernels``
(setup.cfg ``package_dir``), so it cannot collide with another distribution's ``kernels``.
"""

from .key import DitherKey, tensor_id

__all__ = ["DitherKey", "tensor_id"]
