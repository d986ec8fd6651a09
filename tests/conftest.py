"""Shared test set-up.

The machine has 2 cores shared by every rank of a multi-process test: one
thread per process (children inherit the environment; spawn() also sets it),
and the repo root on sys.path so rank processes can import ``tests.*`` and
``rest_ds`` even without the editable install.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Every rank of the model tests imports timm and transformers' SAM (seconds each on
# 2 shared cores): the forkserver that spawn() starts imports them once instead.
from rest_ds.spim.spawn import preload  # noqa: E402

preload("timm", "transformers.models.sam.modeling_sam")
