"""benchmarks/prologue.py on the CPU: every phase is stamped, and the file is written."""

import json
import math
import re

from benchmarks import prologue


def test_every_phase_is_stamped_for_each_variant(tmp_path, capsys):
    res = prologue.main(["--model", "cnn", "--batch-size", "4", "--steps", "3", "--rows", "3",
                         "--device", "cpu", "--skip-guards", "--out", str(tmp_path)])
    variants = ("eager", "rewritten", "rewritten, guards skipped")
    for name in variants:
        r = res[name]
        assert r["step_ms"] > 0 and "function calls" in r["cprofile_forward"]
        assert r["call_to_forward"] >= 0 and r["forward_graph"] > 0
        assert not any(k.startswith("lead_") for k in r)  # the GPU's lag: CUDA only
    # only the rewritten step has graphs of its own: stamps at their ends and in backward
    assert res["eager"]["forward_to_return"] == 0 and math.isnan(res["eager"]["backward_to_graph"])
    for name in variants[1:]:
        assert res[name]["forward_to_return"] > 0 and res[name]["backward_to_graph"] > 0
    saved = json.loads((tmp_path / "cnn_prologue.json").read_text())
    assert set(variants) <= set(saved)


def test_a_budget_plans_the_rewritten_step_and_names_the_file(tmp_path):
    res = prologue.main(["--model", "cnn", "--batch-size", "4", "--steps", "2", "--rows", "1",
                         "--device", "cpu", "--budget", "1", "--swap", "off", "--out", str(tmp_path)])
    assert res["budget"] == "1" and res["swap"] == "off"
    assert int(re.search(r"(\d+) activations recomputed", res["plan"]).group(1)) > 0
    saved = json.loads((tmp_path / "cnn_prologue_1_swap_off.json").read_text())
    assert saved["rewritten"]["step_ms"] > 0
