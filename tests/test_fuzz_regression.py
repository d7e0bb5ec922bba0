"""A small fixed-seed corpus of mutated models through inspect and optimize (the big run is
benchmarks/fuzz.py): every file gets exit 0, 2 or 3, no traceback, an unchanged input, and no
half-written output."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import EXAMPLE
from fuzzing import check_file, mutants
from models import plain_cnn, resnet

SEEDS = [(EXAMPLE / "model.onnx").read_bytes(), plain_cnn().SerializeToString(), resnet().SerializeToString()]
# 80 fresh mutants, plus the files that once broke a promise (found by benchmarks/fuzz.py).
CORPUS = list(mutants(SEEDS, 80, seed=1234)) + [
    (p.stem, p.read_bytes()) for p in sorted((Path(__file__).parent / "corpus").glob("*.onnx"))
]


@pytest.mark.parametrize("name, data", CORPUS, ids=[c[0] for c in CORPUS])
def test_mutant_is_handled(tmp_path, name, data):
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(data)
    assert check_file(path, tmp_path, timeout_s=120) == []
