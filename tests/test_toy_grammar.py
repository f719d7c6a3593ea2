"""Tests of the toy world's prompt grammar, parser and train / held-out split."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from dancegrpo.toy import grammar
from dancegrpo.toy.grammar import SceneSpec


def _kind(prompt: str) -> str:
    return grammar.parse_prompt(prompt).kind


# --------------------------------------------------------------------------- grammar


def test_grammar_size_and_roundtrip():
    prompts = grammar.all_prompts()
    n_objects = len(grammar.COLOURS) * len(grammar.SHAPES)
    pairs = n_objects * (n_objects - 1)
    assert len(prompts) == n_objects * (1 + 4 + 2) + pairs * (1 + 4)
    assert len(set(prompts)) == len(prompts)
    assert prompts == grammar.all_prompts()
    for spec in grammar.all_specs():
        assert grammar.parse_prompt(spec.prompt) == spec


@pytest.mark.parametrize("text, expected", [
    ("a red circle", SceneSpec("single_object", (("red", "circle"),))),
    ("a green square at the top", SceneSpec("position", (("green", "square"),), position="top")),
    ("three yellow triangles", SceneSpec("count", (("yellow", "triangle"),), count=3)),
    ("a red circle and a red square", SceneSpec("two_objects", (("red", "circle"), ("red", "square")))),
    ("a red circle left of a blue square",
     SceneSpec("relation", (("red", "circle"), ("blue", "square")), relation="left of")),
    ("  Two  Blue Circles. ", SceneSpec("count", (("blue", "circle"),), count=2)),
])
def test_parse_known_prompts(text, expected):
    assert grammar.parse_prompt(text) == expected


@pytest.mark.parametrize("text", [
    "", "a purple circle", "a red hexagon on the left", "four red circles", "a red circle in the middle",
    "a red circle near a blue square", "a red circle and a red circle", "a blue square above a blue square",
])
def test_bad_prompts_raise_naming_the_prompt(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        grammar.parse_prompt(text)


@pytest.mark.parametrize("kwargs", [
    dict(kind="sizes", objects=(("red", "circle"),)),
    dict(kind="single_object", objects=(("pink", "circle"),)),
    dict(kind="single_object", objects=(("red", "circle"),), position="left"),
    dict(kind="position", objects=(("red", "circle"),)),
    dict(kind="count", objects=(("red", "circle"),), count=5),
    dict(kind="two_objects", objects=(("red", "circle"),)),
    dict(kind="relation", objects=(("red", "circle"), ("blue", "circle")), relation="near"),
])
def test_invalid_specs_raise(kwargs):
    with pytest.raises(ValueError):
        SceneSpec(**kwargs)


# --------------------------------------------------------------------------- split


def test_split_disjoint_covering_stratified_deterministic():
    train, evals = grammar.split_prompts(0.2, seed=0)
    assert not set(train) & set(evals)
    assert sorted(train + evals) == sorted(grammar.all_prompts())
    assert (train, evals) == grammar.split_prompts(0.2, seed=0)
    for kind in grammar.KINDS:
        n_train = sum(_kind(p) == kind for p in train)
        n_eval = sum(_kind(p) == kind for p in evals)
        assert n_train > 0 and n_eval > 0, kind
        assert abs(n_eval / (n_train + n_eval) - 0.2) < 0.05, kind
    assert grammar.split_prompts(0.2, seed=1)[1] != evals
    with pytest.raises(ValueError):
        grammar.split_prompts(1.5)


def test_split_does_not_depend_on_hash_salt():
    code = "from dancegrpo.toy import grammar; print(grammar.split_prompts(0.2, 0)[1])"
    salt = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"  # differs from this process's salt
    env = dict(os.environ, PYTHONHASHSEED=salt, PYTHONPATH=os.pathsep.join(sys.path))
    output = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert output == f"{grammar.split_prompts(0.2, 0)[1]}\n"
