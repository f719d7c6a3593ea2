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

    from dancegrpo.data import TOY_EVAL_PER_KIND
    from dancegrpo.toy import scenes

    train_raw, held_out_raw = scenes.split_prompts()
    for name, raw, per_kind in (("toy:train", train_raw, None), ("toy:eval", held_out_raw, TOY_EVAL_PER_KIND)):
        balanced = load_prompts(name)
        kinds = Counter(scenes.parse_prompt(p).kind for p in balanced)
        assert set(kinds) == set(scenes.KINDS) and len(set(kinds.values())) == 1, (name, kinds)
        assert set(balanced) <= set(raw)
        if per_kind is None:  # nothing cut: every training prompt is still drawn
            assert set(balanced) == set(raw)
        else:
            assert kinds["relation"] == per_kind
    # Any prefix is balanced too (eval_num_prompts takes a prefix).
    prefix = Counter(scenes.parse_prompt(p).kind for p in load_prompts("toy:eval")[:10])
    assert set(prefix.values()) == {2}
    assert load_prompts("toy:eval_all") == held_out_raw
