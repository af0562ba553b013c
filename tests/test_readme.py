"""The README's two set-up lines are what users and CI run: keep them true."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def setup_lines():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_lines_near_the_top():
    text = (ROOT / "README.md").read_text()
    assert text.index("```bash") < 1200, "set-up lines must be on the README's first screen"
    lines = setup_lines()
    assert len(lines) == 2
    assert lines[0].endswith("python -m bnext.experiments.vgg")
    assert lines[1].endswith("pytest")


def test_ci_runs_the_readme_test_line_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_lines()[1] in ci
