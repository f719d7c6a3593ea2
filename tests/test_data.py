"""Prompt sources and the per-iteration draw."""
import pytest

from dancegrpo.data import load_prompts, prompts_for_iteration


def test_each_epoch_covers_every_prompt_once():
    prompts = [f"p{i}" for i in range(10)]
    drawn = [p for it in range(5) for p in prompts_for_iteration(prompts, it, 4, seed=3)]  # 20 = 2 epochs
    assert sorted(drawn[:10]) == sorted(prompts) and sorted(drawn[10:]) == sorted(prompts)
    assert drawn[:10] != drawn[10:]  # reshuffled


def test_draw_is_a_pure_function_of_seed_and_iteration():
    prompts = [f"p{i}" for i in range(7)]
    assert prompts_for_iteration(prompts, 5, 3, seed=1) == prompts_for_iteration(prompts, 5, 3, seed=1)
    assert prompts_for_iteration(prompts, 5, 3, seed=1) != prompts_for_iteration(prompts, 5, 3, seed=2)


def test_prompt_file_and_builtins(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\n\n  two blue squares \n")
    assert load_prompts(str(f)) == ["a red circle", "two blue squares"]
    train, held_out = load_prompts("toy:train"), load_prompts("toy:eval")
    assert train and held_out and not set(train) & set(held_out)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="toy:nope"):
        load_prompts("toy:nope")


def test_builtin_sets_weight_every_prompt_kind_equally():
    from collections import Counter

    from dancegrpo.toy import grammar
    from dancegrpo.toy.grammar import TOY_EVAL_PER_KIND

    train_raw, held_out_raw = grammar.split_prompts()
    for name, raw, per_kind in (("toy:train", train_raw, None), ("toy:eval", held_out_raw, TOY_EVAL_PER_KIND)):
        balanced = load_prompts(name)
        kinds = Counter(grammar.parse_prompt(p).kind for p in balanced)
        assert set(kinds) == set(grammar.KINDS) and len(set(kinds.values())) == 1, (name, kinds)
        assert set(balanced) <= set(raw)
        if per_kind is None:  # nothing cut: every training prompt is still drawn
            assert set(balanced) == set(raw)
        else:
            assert kinds["relation"] == per_kind
    # Any prefix is balanced too (eval_num_prompts takes a prefix).
    prefix = Counter(grammar.parse_prompt(p).kind for p in load_prompts("toy:eval")[:10])
    assert set(prefix.values()) == {2}
    assert load_prompts("toy:eval_all") == held_out_raw


def test_prompt_set_registry_resolves_prefixes_lazily_and_refuses_clashes(tmp_path, monkeypatch):
    """A non-toy prefix registered by module name serves its sets; unknown prefixes stay file paths."""
    import sys
    import types

    from dancegrpo import data

    module = types.ModuleType("prompt_sets_for_tests")
    module.PROMPT_SETS = {"pets": lambda: ["a cat", "a dog"]}
    monkeypatch.setitem(sys.modules, "prompt_sets_for_tests", module)
    monkeypatch.setattr(data, "PROMPT_SET_MODULES", dict(data.PROMPT_SET_MODULES))
    data.register_prompt_sets("zoo", "prompt_sets_for_tests")
    assert load_prompts("zoo:pets") == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="zoo:pets"):  # the error lists what the prefix offers
        load_prompts("zoo:birds")
    with pytest.raises(ValueError, match="already registered"):
        data.register_prompt_sets("toy", "prompt_sets_for_tests")
    with pytest.raises(ValueError, match="':'"):
        data.register_prompt_sets("a:b", "prompt_sets_for_tests")
    with pytest.raises(FileNotFoundError, match="farm:pets"):  # not a registered prefix: a file path
        load_prompts(str(tmp_path / "farm:pets"))
