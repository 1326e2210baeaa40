"""Real GLUE files through GLUE_DIR: exact row counts and label sets for every task folder present.

Run: GLUE_DIR=/path/to/glue pytest -q tests/test_glue_real.py
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from distil_core.data import load_glue

GLUE_DIR = os.environ.get("GLUE_DIR", "")
pytestmark = [
    pytest.mark.glue,
    pytest.mark.skipif(not GLUE_DIR or not Path(GLUE_DIR).is_dir(), reason="set GLUE_DIR to a folder of GLUE data"),
]

# folder -> (task, {split: rows}, labels: a set of ids, or None for STS-B's float scores in [0, 5])
PUBLISHED = {
    "SST-2": ("sst2", {"train": 67_349, "dev": 872}, {0, 1}),
    "MRPC": ("mrpc", {"train": 3_668, "dev": 408}, {0, 1}),
    "CoLA": ("cola", {"train": 8_551, "dev": 1_043}, {0, 1}),
    "STS-B": ("stsb", {"train": 5_749, "dev": 1_500}, None),
}


def _present() -> list[str]:
    return [f for f in PUBLISHED if GLUE_DIR and (Path(GLUE_DIR) / f).is_dir()]


@pytest.mark.parametrize("folder", _present() or [pytest.param("none", marks=pytest.mark.skip("no GLUE task folders"))])
@pytest.mark.parametrize("split", ["train", "dev"])
def test_real_glue_counts_and_labels(folder, split):
    task, rows, label_set = PUBLISHED[folder]
    ds = load_glue(task, split, data_dir=GLUE_DIR)
    assert len(ds) == rows[split]
    labels = ds["label"][:]
    if label_set is None:
        assert min(labels) == 0.0 and max(labels) == 5.0 and len(set(labels)) > 50  # float scores in [0, 5]
    else:
        assert set(labels) == label_set
    text = ds.column_names[0]
    assert all(isinstance(t, str) and t for t in ds[text][:])  # no empty or merged-away rows
