"""run.num_threads: auto follows the cores other processes leave free (issue 15, item 9)."""
from __future__ import annotations

import os

import pytest
import torch

from dancegrpo import cpu_threads
from dancegrpo.config import ConfigError, load_config
from dancegrpo.trainer import Trainer

TICK = os.sysconf("SC_CLK_TCK")


def _stat(busy_per_cpu: list[int], idle_per_cpu: list[int]) -> str:
    lines = [f"cpu  {sum(busy_per_cpu)} 0 0 {sum(idle_per_cpu)} 0 0 0 0 0 0"]
    for i, (busy, idle) in enumerate(zip(busy_per_cpu, idle_per_cpu)):
        # user nice system idle iowait irq softirq steal guest guest_nice
        lines.append(f"cpu{i} {busy - 3} 1 1 {idle} 5 0 1 0 0 0")
    lines.append("intr 1 2 3")
    return "\n".join(lines)


def test_busy_seconds_counts_user_system_irq_but_not_idle_or_iowait():
    text = _stat([100, 250, 40], [900, 10, 0])
    assert cpu_threads.read_busy_seconds([0, 2], text) == pytest.approx((100 + 40) / TICK)
    assert cpu_threads.read_busy_seconds([1], text) == pytest.approx(250 / TICK)
    assert cpu_threads.read_busy_seconds([3], text) is None  # a CPU the file does not list


@pytest.mark.parametrize("cpus, others, cap, expected", [
    (2, 0.0, 2, 2), (2, 0.2, 2, 2), (2, 0.3, 2, 1), (2, 1.0, 2, 1), (2, 2.0, 2, 1),
    (8, 3.0, 8, 5), (8, 0.0, 4, 4), (2, -0.5, 2, 2),
])
def test_threads_for_free_cores(cpus, others, cap, expected):
    assert cpu_threads.threads_for_free_cores(cpus, others, cap) == expected


def test_governor_drops_to_the_free_cores_and_comes_back(monkeypatch):
    """Readings are scripted: others keep one of two cores busy, then stop."""
    clock = {"wall": 0.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(cpu_threads, "allowed_cpus", lambda: [0, 1])
    monkeypatch.setattr(cpu_threads, "read_busy_seconds", lambda cpus: clock["busy"])
    monkeypatch.setattr(cpu_threads.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(cpu_threads.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(cpu_threads.time, "sleep", lambda s: clock.update(wall=clock["wall"] + s))
    before = torch.get_num_threads()
    try:
        governor = cpu_threads.ThreadGovernor(probe_seconds=1.0)  # quiet probe: nothing busy
        assert governor.threads == 2 and torch.get_num_threads() == 2

        def advance(seconds, own_cores, other_cores):
            clock["wall"] += seconds
            clock["own"] += seconds * own_cores
            clock["busy"] += seconds * (own_cores + other_cores)

        advance(2.0, own_cores=1.0, other_cores=1.0)  # another process holds a whole core
        assert governor.update() == 1 and torch.get_num_threads() == 1
        advance(2.0, own_cores=1.0, other_cores=0.0)  # it stopped
        assert governor.update() == 2 and torch.get_num_threads() == 2
        advance(0.01, own_cores=1.0, other_cores=1.0)  # too short an interval to read: unchanged
        assert governor.update() == 2
    finally:
        torch.set_num_threads(before)


def test_num_threads_values_are_checked_at_load(tiny_config):
    for bad in (0, -1, "four", 1.5, True):
        tiny_config["run"]["num_threads"] = bad
        with pytest.raises(ConfigError, match="run.num_threads"):
            load_config(tiny_config)
    for good in (1, 3, "auto", None):
        tiny_config["run"]["num_threads"] = good
        assert load_config(tiny_config).run.num_threads == good


def test_auto_threads_in_the_trainer_are_logged_and_do_not_change_results(tiny_config):
    """One iteration with 'auto' equals one with a fixed count (the toy model's results do not
    depend on the thread count), and the count in force is reported."""
    before = torch.get_num_threads()
    try:
        tiny_config["data"]["eval_prompts"] = None
        tiny_config["run"]["num_threads"] = 1
        fixed = Trainer(tiny_config).step()
        tiny_config["run"]["num_threads"] = 2
        two = Trainer(tiny_config).step()
        tiny_config["run"]["num_threads"] = "auto"
        auto = Trainer(tiny_config).step()
    finally:
        torch.set_num_threads(before)
    assert 1 <= auto["cpu/threads"] <= len(cpu_threads.allowed_cpus())
    for key in ("loss", "grad_norm", "reward/rewards_for_tests:mean_brightness_mean", "ratio_mean"):
        assert fixed[key] == two[key] == auto[key], key


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_line_makes_idle_openmp_threads_sleep_unless_told(given, expected):
    """`dancegrpo` sets OMP_WAIT_POLICY before torch loads (it is read only then); a user's value stays."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, sys, dancegrpo.cli; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [expected, "False"]
