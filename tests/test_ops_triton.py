"""The Triton kernels, run on the CPU by the Triton interpreter, against the same references.

TRITON_INTERPRET=1 has to be set before anything imports triton (Triton's own jit'd library
functions, e.g. tl.sum, are built at import), and other tests of this process may already
have imported it, so the triton cases of the op tests run in one fresh subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-k", "triton",
           str(TESTS / "test_ops_sde_step.py"), str(TESTS / "test_ops_clipped_loss.py")]
    result = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail, tail
