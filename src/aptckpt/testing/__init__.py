"""Test helpers for aptckpt and for authors of backend plugins.

* :func:`assert_state_equal` -- bit-exact comparison of two states, container
  types, key order, dtypes, devices, ``nn.Parameter`` and aliasing included.
* :func:`check_backend` -- run the conformance suite against a backend in one call.
* :mod:`aptckpt.testing.strategies` -- hypothesis strategies for states.
* :mod:`aptckpt.testing.conformance` -- :class:`BackendConformance`, the suite
  every backend passes: subclass it in a pytest module and set ``backend``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aptckpt.testing._compare import assert_state_equal

if TYPE_CHECKING:
    from aptckpt.backends.base import Backend

__all__ = ["assert_state_equal", "check_backend"]


def check_backend(
    backend: str | type[Backend],
    *,
    options: Mapping[str, Any] | None = None,
    stores_empty_bytes: bool = True,
) -> tuple[str, ...]:
    """Run the conformance suite against ``backend``; see
    :func:`aptckpt.testing.conformance.check_backend` (it needs pytest and hypothesis,
    imported only when this is called)."""
    from aptckpt.testing import conformance

    return conformance.check_backend(
        backend, options=options, stores_empty_bytes=stores_empty_bytes
    )
