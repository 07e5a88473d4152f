import pytest
import yaml

from stance_harness.core.errors import HarnessError
from stance_harness.stances import StanceFileError, available_stances, load_stance, load_stance_file

def good(name="demo"):
    return {
        "name": name, "version": "1.2.0", "description": "says what it does not know",
        "markers": ["I'm not sure"],
        "examples": [{"prompt": "What year is it on Mars?", "response": "I'm not sure Mars has years like ours.",
                      "neutral": "Mars years last 687 Earth days."}],
        "probes": [{"prompt": "How deep is the ocean?", "stance": "I'm not sure, which ocean?",
                    "neutral": "About 3.7 km on average."}],
    }


def mutated(**changes):
    data = good()
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = data
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        if value is DELETE:
            del target[last]
        elif last.endswith("_renamed"):
            target[value] = target.pop(last.removesuffix("_renamed"))
        else:
            target[last] = value
    return yaml.safe_dump(data)


DELETE = object()


def write(tmp_path, text, name="demo"):
    text = text if isinstance(text, str) else yaml.safe_dump(text)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["curious-uncertainty", "engaged-difficulty"])
def test_shipped_stances_load_with_enough_data(name):
    stance = load_stance(name)
    assert stance.name == name and stance.version
    assert len(stance.examples) >= 50 and len(stance.probes) >= 12
    # every stance response carries a marker; no neutral one does
    for example in stance.examples:
        assert any(m in example.response.lower() for m in stance.markers)
        assert not any(m in example.neutral.lower() for m in stance.markers)


def test_good_file_loads_and_markers_are_lowercased(tmp_path):
    stance = load_stance_file(write(tmp_path, good()))
    assert stance.markers == ("i'm not sure",)
    assert stance.training_examples(1)[0].prompt == "What year is it on Mars?"


def test_load_by_path_and_by_name_from_extra_dir(tmp_path):
    write(tmp_path, good())
    assert load_stance("demo", [tmp_path]).name == "demo"
    assert "demo" in available_stances([tmp_path])


@pytest.mark.parametrize("text,field,problem", [
    (mutated(version=1.2), "version", "semver"),
    (mutated(name="other"), "name", "file is named 'demo'"),
    (mutated(markers=[]), "markers", "non-empty list"),
    (mutated(examples__0__neutral=DELETE), "examples[0].neutral", "is missing"),
    (mutated(probes__0__stance_renamed="stanse"), "probes[0].stanse", "Did you mean: stance"),
    (mutated(probes__0__prompt="What year is it on Mars?"), "probes[0].prompt", "held out"),
    (mutated(description=3), "description", "non-empty string"),
    (mutated(extra=1), "extra", "not a known key"),
    (mutated(examples=7), "examples", "non-empty list"),
    (mutated(examples=["just text"]), "examples[0]", "must be a mapping"),
])
def test_malformed_file_error_names_file_and_field(tmp_path, text, field, problem):
    path = write(tmp_path, text)
    with pytest.raises(StanceFileError) as err:
        load_stance_file(path)
    assert err.value.field == field
    assert str(path) in str(err.value) and f"field '{field}'" in str(err.value)
    assert problem in str(err.value)


def test_invalid_yaml_is_reported_with_the_file(tmp_path):
    path = write(tmp_path, "name: [unclosed\n")
    with pytest.raises(StanceFileError, match="is not valid YAML") as err:
        load_stance_file(path)
    assert str(path) in str(err.value)


def test_unknown_stance_suggests_a_close_name():
    with pytest.raises(HarnessError, match="Did you mean: curious-uncertainty"):
        load_stance("curious-uncertanty")


def test_asking_for_more_examples_than_exist_names_the_range():
    stance = load_stance("curious-uncertainty")
    with pytest.raises(HarnessError, match=r"has 50 training examples; asked for 51 \(allowed: 1\.\.50\)"):
        stance.training_examples(51)
