"""A small fixed-seed corpus of mutated inputs through graphslim (the big run is
benchmarks/fuzz.py): every model, data set and recipe gets exit 0, 2 or 3, no traceback, one
line of error, an unchanged input, no half-written output and no temporary left behind. Besides
fresh mutants, every file that once broke a promise and the hostile inputs of issue 18 run as
they are (``tests/corpus/``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import EXAMPLE
from fuzzing import check_data_file, check_file, check_recipe_file, data_mutants, mutants, recipe_mutants
from models import plain_cnn, resnet

CORPUS = Path(__file__).parent / "corpus"
SEEDS = [(EXAMPLE / "model.onnx").read_bytes(), plain_cnn().SerializeToString(), resnet().SerializeToString()]
# 80 fresh mutants, plus the files that once broke a promise (found by benchmarks/fuzz.py).
MODELS = list(mutants(SEEDS, 80, seed=1234)) + [(p.stem, p.read_bytes()) for p in sorted(CORPUS.glob("*.onnx"))]
DATA_SEEDS = [(EXAMPLE / "data.npz").read_bytes(), (CORPUS / "bzip2_bomb.npz").read_bytes()]
DATA = list(data_mutants(DATA_SEEDS, 24, seed=1234)) + [(p.stem, p.read_bytes()) for p in sorted(CORPUS.glob("*.npz"))]
RECIPE_SEEDS = [(".json", b'["fold-batchnorm", {"name": "prune-channels", "options": {"ratio": 0.5}}]')]
RECIPES = list(recipe_mutants(RECIPE_SEEDS, 24, seed=1234)) + [
    (p.name, p.read_bytes()) for p in sorted([*CORPUS.glob("*.json"), *CORPUS.glob("*.yaml")])
]


@pytest.mark.parametrize("name, data", MODELS, ids=[c[0] for c in MODELS])
def test_mutant_is_handled(tmp_path, name, data):
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(data)
    assert check_file(path, tmp_path, timeout_s=120) == []


@pytest.mark.parametrize("name, data", DATA, ids=[c[0] for c in DATA])
def test_data_mutant_is_handled(tmp_path, name, data):
    path = tmp_path / f"{name}.npz"
    path.write_bytes(data)
    assert check_data_file(path, tmp_path, timeout_s=120) == []


@pytest.mark.parametrize("name, data", RECIPES, ids=[c[0] for c in RECIPES])
def test_recipe_mutant_is_handled(tmp_path, name, data):
    path = tmp_path / (name if name.endswith((".json", ".yaml")) else f"{name}.json")
    path.write_bytes(data)
    assert check_recipe_file(path, tmp_path, timeout_s=120) == []
