"""`make demo`: the comparison it prints, and a second run that reuses everything."""
from __future__ import annotations

from bottleneck.demo import DemoConfig, run_demo


def test_demo_compares_four_approaches_and_a_rerun_is_twice_as_fast(tmp_path):
    work, cache = tmp_path / "demo", tmp_path / "cache"
    first = run_demo(work, cache, DemoConfig(), log=lambda message: None)
    approaches = [row["approach"] for row in first.rows]
    assert approaches == ["(a) transferred features"] * 2 + ["(b) raw pixels"] * 2 + \
        ["(c) random-weights features"] * 2 + ["(d) trained from scratch"]
    assert all(0 <= row["test_accuracy"] <= 1 for row in first.rows)
    best = {p: max(r["test_accuracy"] for r in first.rows if r["approach"].startswith(p)) for p in ("(a)", "(b)", "(d)")}
    assert first.negative_transfer == (best["(a)"] < max(best["(b)"], best["(d)"]))
    assert sum(first.computed.values()) > 0 and 0 <= first.domain["mmd_p_value"] <= 1
    page = first.report.read_text()
    assert "Does transfer help?" in page and "Frechet distance" in page

    second = run_demo(work, cache, DemoConfig(), log=lambda message: None)
    assert sum(second.computed.values()) == 0
    assert second.seconds <= first.seconds / 2, (first.seconds, second.seconds)
    assert [r["test_accuracy"] for r in second.rows] == [r["test_accuracy"] for r in first.rows]
