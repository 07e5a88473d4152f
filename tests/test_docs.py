"""The README's tables list what the registries hold, so the docs cannot drift from the code."""

from pathlib import Path

from harness.methods import METHODS
from harness.models import MODELS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def table_names(heading: str) -> set[str]:
    section = README.split(heading, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {name.strip("` ") for row in rows for name in row.split("|")[1].split(",") if name.strip().startswith("`")}


def test_methods_table_lists_every_registered_method():
    assert table_names("## Methods") == set(METHODS.names())


def test_models_table_lists_every_alias():
    names = {n.split(" ")[0].strip("`") for n in table_names("## Models")}  # "`tiny-qwen2` (default)"
    assert names == set(MODELS.names())


def test_readme_opens_with_the_two_commands():
    commands = [line for line in README.split("```bash", 1)[1].split("```", 1)[0].splitlines() if line.strip()]
    assert [c.split("#")[0].strip() for c in commands] == ["./dev.sh suites", "./dev.sh test"]
