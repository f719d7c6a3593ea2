"""bench/ops_overhead.py runs, and its eager contenders compute what the fused op computes."""
import torch

from bench import ops_overhead
from dancegrpo import ops


def test_eager_formulas_are_the_fused_step():
    gen = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    kw = dict(sigma=ops_overhead.SIGMA, sigma_next=ops_overhead.SIGMA_NEXT, eta=ops_overhead.ETA)
    want_next, want_logp = ops.fused_sde_step(v, x, noise=noise, backend="torch", **kw)
    got_next, got_logp = ops_overhead.eager_rollout(v, x, noise, kw["sigma"], kw["sigma_next"], kw["eta"])
    torch.testing.assert_close(got_next, want_next, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_logp, want_logp, rtol=1e-12, atol=1e-12)
    got_train = ops_overhead.eager_log_prob(v, x, want_next, kw["sigma"], kw["sigma_next"], kw["eta"])
    torch.testing.assert_close(got_train, want_logp, rtol=1e-12, atol=1e-12)


def test_one_round_reports_every_contender(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    ops_overhead.main(["--rounds", "1", "--target-ms", "0.1", "--small-only", "--out", str(out)])
    import json

    rows = json.loads(out.read_text())["rows"]
    names = {row["contender"] for row in rows}
    for backend in ("torch", "cpp"):
        assert {f"fused[{backend}]", f"sampler[{backend}]", f"train fused[{backend}]"} <= names
    assert {"eager", "eager_sampler", "train eager"} <= names
    assert all(row["us_per_call"] > 0 for row in rows)
    assert "eager / this" in capsys.readouterr().out
