"""BPO vs GRPO comparison command: a short setting (CI), its table against the per-run numbers."""

import json
import statistics

import pytest

from r4b_fast.training.compare import ROWS, derived, main, summarise, table


def test_summary_and_ratios_are_exact():
    s = summarise({"bpo": [{"a": 1.0, "b": 2.0}, {"a": 3.0}], "grpo": [{"a": 5.0}]})
    assert s["bpo"] == {"a": (2.0, statistics.stdev([1.0, 3.0]))} and s["grpo"] == {"a": (5.0, 0.0)}
    m = {"eval/length_auto_easy": 6.0, "eval/length_no_think_easy": 4.0, "eval/length_auto_hard": 10.0,
         "eval/length_think_easy": 8.0, "eval/length_think_hard": 24.0}
    d = derived(m)
    assert d["eval/ratio_auto_no_think_easy"] == 1.5 and d["eval/ratio_auto_think_mix"] == 0.5
    assert "eval_t1/ratio_auto_think_mix" not in d
    text = table({"bpo": {"eval/acc_auto_hard": (0.5, 0.1)}}, {"eval/acc_auto_hard": 0.25}, 3)
    assert "| auto acc, hard | 0.25 | 0.50 ± 0.10 | - | - |" in text


def test_compare_short_setting_writes_table_results_and_png(tmp_path, tiny_policy_dir):
    out = tmp_path / "cmp"
    argv = ["--model", str(tiny_policy_dir), "--seeds", "0", "1", "--steps", "1", "--prompts", "1", "--g", "1",
            "--max-new-tokens", "6", "--min-think-tokens", "2", "--eval-items", "4", "--output-dir", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    for algo in ("bpo", "grpo"):
        runs = res["runs"][algo]
        assert sorted(runs) == ["0", "1"]
        for key in ("eval/acc_auto_hard", "eval_t1/think_rate_hard", "eval/acc_think_hard"):
            mean, sd = res["summary"][algo][key]
            values = [runs[s][key] for s in ("0", "1")]
            assert mean == pytest.approx(statistics.fmean(values)) and sd == pytest.approx(statistics.stdev(values))
        assert (out / f"{algo}-seed1" / "model" / "model.safetensors").exists()
    text = (out / "table.md").read_text()
    assert text.count("\n") == 2 + len(ROWS) == 2 + 9 and "BPO T=1 (mean ± sd, 2 seeds)" in text
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--seeds", "0", "0", "--output-dir", str(tmp_path)])
    assert "--seeds: repeated seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--steps", "0", "--output-dir", str(tmp_path)])
    assert "--steps: must be positive" in capsys.readouterr().err
