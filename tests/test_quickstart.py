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
