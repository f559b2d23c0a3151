"""The plot command's input handling (the images themselves are checked on a real run in test_e2e.py)."""

import pytest

from research_rl.plot import main, read_metrics

pytestmark = pytest.mark.unit


def test_read_metrics_skips_warmup_rows_and_names_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": -1, "warmup/nll": 3.0}\n{"step": 1, "rollout/reward_mean": 0.5, "time": 1.0}\n'
                    '{"step": 2, "rollout/reward_mean": 0.7, "note": "x"}\n')
    series = read_metrics(path)
    assert series == {"rollout/reward_mean": [(1, 0.5), (2, 0.7)]}
    path.write_text('{"step": 1}\n{"step": 2,\n')
    with pytest.raises(ValueError, match=f"{path}:2:"):
        read_metrics(path)


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit, match="metrics.jsonl not found"):
        main([str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text('{"step": -1, "warmup/nll": 3.0}\n')
    with pytest.raises(SystemExit, match="no training steps"):
        main([str(tmp_path)])


def test_the_reward_band_is_the_interval_of_the_trailing_mean_over_trajectories(tmp_path):
    import json
    import math

    from research_rl.plot import plot_run, reward_moments, windowed_interval

    rows = [{"step": s, "time": float(s), "rollout/trajectories": 4.0, "rollout/reward_mean": 0.1 * s,
             "rollout/reward_std": 0.1, "rollout/format_ok": 0.5} for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    moments = reward_moments(read_metrics(tmp_path / "metrics.jsonl"))
    assert sorted(moments) == list(range(1, 9)) and moments[2] == pytest.approx((4.0, 0.8, 4 * (0.01 + 0.04), 2.0))
    means, ses = windowed_interval([moments[s] for s in sorted(moments)], 2)
    # steps 1-2 pooled: rewards {0.1 ± 0.1} and {0.2 ± 0.1}, 4 each: mean 0.15, sample variance 8 * 0.0125 / 7
    assert means[1] == pytest.approx(0.15) and ses[1] == pytest.approx(math.sqrt(8 * 0.0125 / 7 / 8))
    assert means[0] == pytest.approx(0.1) and ses[0] == pytest.approx(math.sqrt(4 * 0.01 / 3 / 4))
    assert (tmp_path / "plots" / "reward.png") in plot_run(tmp_path, smooth=2)
