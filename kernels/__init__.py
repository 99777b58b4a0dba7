"""hvdquant.kernels: the arithmetic of every scheme, once per device.

- :mod:`.key`   — :class:`DitherKey`, the (seed, step, tensor id, sender) key of the dither stream;
- :mod:`.arith` — scalar arithmetic (Philox-4x32-10, dither mapping, rounding) written once;
- :mod:`.cpu`   — Numba ``njit(parallel=True)`` CPU kernels built from :mod:`.arith`.

This folder sits at ``kernels/`` in the checkout and installs as ``hvdquant.kernels``
(setup.cfg ``package_dir``), so it cannot collide with another distribution's ``kernels``.
"""

from .key import DitherKey, tensor_id

__all__ = ["DitherKey", "tensor_id"]
