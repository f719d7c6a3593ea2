"""The shipped quickstart recipe and the committed base model run through the trainer."""
import math
from pathlib import Path

from dancegrpo.trainer import Trainer

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def test_quickstart_recipe_runs_on_the_committed_base(tmp_path):
    trainer = Trainer(RECIPE, overrides=[f"run.output_dir={tmp_path}", "run.num_threads=1",
                                         "grpo.prompts_per_iteration=2", "grpo.group_size=4",
                                         "trainer.micro_batch_size=4", "data.eval_num_prompts=4"])
    metrics = trainer.step()
    assert metrics["first_update_logp_max_dev"] == 0.0
    assert 0.0 <= metrics["reward/toy_geneval_mean"] <= 1.0 and math.isfinite(metrics["loss"])
    held_out = trainer.evaluate()
    assert 0.0 <= held_out["eval/toy_geneval_accuracy"] <= 1.0


def test_quickstart_recipe_raises_the_checker_reward_on_count_prompts(tmp_path):
    """A short, seeded version of the quickstart on the real base, checker and sampler.

    Count prompts are the base's weakest kind that it sometimes gets right, so a few
    iterations on them move the checker's score measured the way the quickstart measures
    it: ODE sampler, fixed noise, before and after.
    """
    from dancegrpo.toy import grammar

    train, _ = grammar.split_prompts()
    counts = [p for p in train if grammar.parse_prompt(p).kind == "count"][:COUNT_PROMPTS]
    prompt_file = tmp_path / "counts.txt"
    prompt_file.write_text("\n".join(counts))
    trainer = Trainer(RECIPE, overrides=[
        f"run.output_dir={tmp_path / 'run'}", "run.num_threads=1", f"data.train_prompts={prompt_file}",
        "data.eval_prompts=", f"grpo.prompts_per_iteration={COUNT_PROMPTS}",
        f"trainer.iterations={COUNT_ITERATIONS}", "trainer.checkpoint_every=1000",
        "trainer.ema_decay=null"])  # an EMA of 0.95 still lags the raw weights after 40 iterations
    probe = counts * EVAL_REPEATS  # each repeat gets its own fixed noise
    before = trainer.evaluate(probe)["eval/toy_geneval"]
    trainer.train(progress=False)
    after = trainer.evaluate(probe)["eval/toy_geneval"]
    assert after > before + 0.05, (before, after)


# Measured: graded score 0.56 -> 0.68 and 0.50 -> 0.61 with run.seed 1 and 2 (about 65 s on one thread).
COUNT_PROMPTS, COUNT_ITERATIONS, EVAL_REPEATS = 8, 40, 8
