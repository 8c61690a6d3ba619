"""Test helpers for aptckpt and for authors of backend plugins.

* :func:`assert_state_equal` -- bit-exact comparison of two states, container
  types, key order, dtypes, devices, ``nn.Parameter`` and aliasing included.
* :mod:`aptckpt.testing.strategies` -- hypothesis strategies for states.
* :mod:`aptckpt.testing.conformance` -- :class:`BackendConformance`, the suite
  every backend passes: subclass it in a pytest module and set ``backend``.
"""

from aptckpt.testing._compare import assert_state_equal

__all__ = ["assert_state_equal"]
