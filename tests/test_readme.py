"""The README's promises to a new user: its example runs and plans, early in the file; it stays a
page for users (short, no commit hashes), with the set-up commands."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tested: tests/test_readme.py -->"


def _example() -> tuple[str, int]:
    """The code block under the marker, and the line it ends on (1-based)."""
    text = README.read_text()
    m = re.search(re.escape(MARKER) + r"\n```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no python block under {MARKER!r}"
    return m.group(1), text[:m.end()].count("\n") + 1


def test_the_example_is_within_the_first_60_lines():
    _, end = _example()
    assert end <= 60, f"the example ends on line {end}"


def test_the_example_plans_the_model_and_gives_the_forward_back():
    code, _ = _example()
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - the README's own example
    ac, model = ns["ac"], ns["model"]
    assert ac.plan.stop_reason == "fits" and ac.plan.recomputed
    assert ac.plan.predicted_peak_B <= ac.plan.budget_B < ac.plan.baseline_peak_B
    assert ac.state == "off" and "forward" not in model.__dict__  # removed


def test_the_example_runs_as_a_script_and_prints_the_plan_line(tmp_path):
    code, _ = _example()
    script = tmp_path / "example.py"
    script.write_text(code)
    # as a user's script: run from elsewhere, the package importable as installed (or, where
    # it is not installed, from this checkout)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(README.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"budget .* predicted peak .* activations recomputed .*\[fits\]", out.stdout)


def test_the_readme_stays_a_page_for_users():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert not re.findall(r"`[0-9a-f]{7,40}`", text), "commit hashes belong in reports and commits"
    assert "pip install -e '.[models]' && python -m recipes.resnet152" in text  # the main job
    assert "pip install -e '.[test]' && python -m pytest -q" in text  # the tests
