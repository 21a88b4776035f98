"""Every registered loss is checked against an independent reference and, where it streams, against its
materialised form: adding a loss means adding it here, or this test fails."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_streaming import LOSSES as STREAMING_CHECKED

from amad.losses import available
from amad.losses.registry import _REGISTRY

HERE = Path(__file__).parent

#: Registered name -> (test file, test that compares it with an independent float64 formulation).
REFERENCE_CHECKS = {
    "amad-mse": ("test_alignment.py", "test_matches_reference"),
    "amad-kl": ("test_alignment.py", "test_matches_reference"),
    "amad-token": ("test_alignment.py", "test_matches_reference"),
    "amad-s2t": ("test_alignment.py", "test_matches_reference"),
    "amad-projected": ("test_alignment.py", "test_projected_matches_reference_and_gradcheck"),
    "one-to-one": ("test_one_to_one.py", "test_matches_loop_reference"),
    "head-mean": ("test_head_mean.py", "test_matches_loop_reference"),
    "rkd-d": ("test_rkd.py", "test_matches_loop_reference"),
    "shd": ("test_shd.py", "test_matches_loop_reference"),
    "minilm-relations": ("test_minilm.py", "test_relation_heads_differ_from_attention_heads"),
}


def functions_in(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("name", available())
def test_every_loss_has_a_reference_check(name: str) -> None:
    assert name in REFERENCE_CHECKS, f"{name} is registered but has no reference check listed here"
    file, function = REFERENCE_CHECKS[name]
    assert function in functions_in(HERE / file), f"{file} has no {function} (the reference check of {name})"


@pytest.mark.parametrize("name", available())
def test_every_loss_streams_and_is_checked_or_says_why_not(name: str) -> None:
    loss_class = _REGISTRY[name]
    if loss_class.streaming_fn is None:
        assert loss_class.no_streaming_reason, f"{name} has no streaming form and does not say why"
        assert name not in {n for n, _ in STREAMING_CHECKED}
    else:
        assert name in {n for n, _ in STREAMING_CHECKED}, f"{name} streams but test_streaming does not check it"


def test_streaming_flag_follows_the_loss() -> None:
    assert {n for n in available() if _REGISTRY[n].streaming_fn is None} == {"amad-projected", "rkd-d",
                                                                            "minilm-relations"}
