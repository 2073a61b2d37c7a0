"""JAX test configuration: enable float64 once, at import time.

``jax_enable_x64`` is process-global (it also affects any other JAX test in the
same pytest process), so it is set here exactly once; float32 tests pass
explicit dtypes everywhere.
"""

import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
