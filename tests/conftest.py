"""Suite-wide settings: one intra-op thread.

The tests run many tiny tensor operations, for which thread start-up dominates; on a busy 2-core machine two
threads were measured up to ~10x slower than one. Subprocesses (bundle runs) inherit OMP_NUM_THREADS.
Override with ANOFPDM_TEST_THREADS.
"""

import os

_THREADS = os.environ.get("ANOFPDM_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", _THREADS)

import torch  # noqa: E402  (after OMP_NUM_THREADS is set)

torch.set_num_threads(int(_THREADS))
