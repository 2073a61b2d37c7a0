"""dpcore is numpy/scipy only: importing all of it loads no deep-learning framework."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import dpcore, dpcore.accounting, dpcore.ledger, dpcore.cli
import dpcore.sampling, dpcore.clipping, dpcore.noise
import dpcore.accounting.prv, dpcore.accounting.pld
bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'jax', 'jaxlib', 'flax', 'optax', 'dp_torch', 'dp_jax', 'tensorflow'})
print(','.join(bad))
"""


def test_import_dpcore_loads_no_framework() -> None:
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
