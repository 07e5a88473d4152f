"""The catalogue of bad inputs: each one gets a harness message that names the option, file or
field and says what is allowed or what to do, before any training, and never a traceback from
inside a library. Options are checked through the plugin's own parsing (in-process, a fake
pytest config) and, for a sample, through real pytest runs (exit 4, one line)."""

import json
import re
import types
from pathlib import Path

import pytest

from stance_harness.core.errors import HarnessError

RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 5}


# -- the context the bad inputs are made in ----------------------------------------------------
class Context:
    def __init__(self, root: Path, session, tiny):
        self.root, self.session, self.tiny = root, session, tiny

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def model_dir(self, name: str, **files) -> Path:
        """A copy of tiny-qwen2's directory with some files replaced (None: removed)."""
        import shutil

        target = self.root / name
        shutil.copytree(self.tiny.path, target)
        for file, content in files.items():
            path = target / file.replace("__", ".")
            if content is None:
                path.unlink()
            else:
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return target

    def stance_yaml(self, name: str, text: str, directory: str = "stances-extra") -> Path:
        return self.file(f"{directory}/{name}.yaml", text)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, harness, tiny_qwen2):
    return Context(tmp_path_factory.mktemp("bad-inputs"), harness, tiny_qwen2)


def options(ctx, **given):
    """The plugin's option parsing, on a fake config holding these options over the defaults."""
    from stance_harness.options import HarnessOptions, given_defaults

    defaults = {**given_defaults(), "--model": "tiny-qwen2", "--reports-dir": str(ctx.root / "reports")}
    values = {**defaults, **{f"--{k.replace('_', '-')}": v for k, v in given.items()}}
    config = types.SimpleNamespace(getoption=values.__getitem__, rootpath=ctx.root,
                                   invocation_params=types.SimpleNamespace(args=()))
    return HarnessOptions.from_config(config)


def train(ctx, method="lora", **arguments):
    """Build and check a request as training would, without training."""
    return ctx.session.check_request(method, **{"examples": 10, "recipe": RECIPE, **arguments})


def lora(ctx, r=2):
    """A trained run (cached in the session): what the helpers' cases hand over."""
    return ctx.session.train("lora", examples=10, recipe=RECIPE, r=r)


def _train(method="full", **kwargs):
    """Named as the plugin's `train` fixture is: what a test hands over when it forgets to call it."""


GOOD_STANCE = (Path(__file__).resolve().parents[1] / "stances" / "curious-uncertainty.yaml").read_text()

CASES = [
    # -- command-line options, checked at start-up -------------------------------------------
    ("model: unknown alias", lambda c: options(c, model="qwen-7b"), r"--model 'qwen-7b' is not a known alias.*Did you mean"),
    ("model: hub id not cached", lambda c: options(c, model="nobody/no-such-model"),
     r"not in the local HF cache.*hf download nobody/no-such-model"),
    ("model-args: bad dtype", lambda c: options(c, model_args="dtype=fp8"), r"dtype='fp8' is not allowed; use one of"),
    ("model-args: misspelt key", lambda c: options(c, model_args="devise=cpu"), r"unknown key 'devise'. Did you mean: device"),
    ("model-args: not key=value", lambda c: options(c, model_args="cpu"), r"'cpu' is not key=value"),
    ("model-args: bad device", lambda c: options(c, model_args="device=tpu"), r"device='tpu' is not allowed; use auto, cpu, cuda"),
    ("model-args: cuda without CUDA", lambda c: options(c, model_args="device=cuda"), r"device=cuda: this machine has no CUDA device"),
    ("model-args: bad device_map", lambda c: options(c, model_args="device_map=everywhere"), r"device_map='everywhere' is not allowed; use auto"),
    ("num-processes without a launcher", lambda c: options(c, num_processes=2), r"--num-processes 2 needs --launcher accelerate"),
    ("num-processes 0", lambda c: options(c, launcher="accelerate", num_processes=0), r"--num-processes must be >= 1"),
    ("recipe: fp16 on the CPU", lambda c: train(c, recipe={**RECIPE, "fp16": True}), r"recipe: fp16=True on the CPU"),
    ("recipe: bad bf16", lambda c: train(c, recipe={**RECIPE, "bf16": "on"}), r"recipe: bf16 must be True, False or 'auto'"),
    ("model-args: fp16 on the CPU", lambda c: options(c, model_args="dtype=float16"), r"float16 does not train on the CPU"),
    ("model-args: revision of an embedded model", lambda c: options(c, model_args="revision=main"),
     r"revision='main': tiny-qwen2 is an embedded model.*no revisions"),
    ("model-args: trust_remote_code not a bool", lambda c: options(c, model_args="trust_remote_code=maybe"),
     r"trust_remote_code='maybe': use true or false"),
    ("reports-dir: a file", lambda c: options(c, reports_dir=str(c.file("a-file", "x"))), r"--reports-dir .*a-file: it is a file, not a directory"),
    ("reports-dir: cannot be made", lambda c: options(c, reports_dir=str(c.file("blocker", "x") / "reports")),
     r"--reports-dir .*blocker/reports: cannot write there"),
    ("verdict-json: a directory", lambda c: options(c, verdict_json=str(c.root)), r"--verdict-json .*: it is a directory; name the file"),
    ("verdict-json: cannot be written", lambda c: options(c, verdict_json=str(c.file("blocker2", "x") / "v.json")),
     r"--verdict-json .*blocker2: cannot write there|--verdict-json .*blocker2: it is a file"),
    ("stance-dir: missing", lambda c: options(c, stance_dir=[str(c.root / "nowhere")]), r"--stance-dir .*nowhere: no such directory"),
    ("analysis-timeout: negative", lambda c: options(c, analysis_timeout=-1.0), r"--analysis-timeout must be >= 0"),
    ("repeat: zero", lambda c: options(c, repeat=0), r"--repeat must be >= 1"),
    ("fail-on: without a baseline", lambda c: options(c, fail_on=["ece:+0.01"]), r"--fail-on needs --compare-baseline NAME"),
    ("fail-on: malformed rule", lambda c: options(c, compare_baseline="main", fail_on=["ece=0.1"]), r"bad rule 'ece=0.1': expected METRIC"),
    ("fail-on: wrong sign", lambda c: options(c, fail_on=["ece:-0.01"], compare_baseline="main"),
     r"ece is better when lower; a regression is an increase: write ece:\+0.01"),
    ("compare-baseline: missing", lambda c: options(c, compare_baseline="main"), r"no baseline 'main' in .*there are no baselines yet"),
    ("save-baseline: bad name", lambda c: options(c, save_baseline="a/b"), r"bad baseline name 'a/b'"),
    ("run-memory: not a size", lambda c: options(c, run_memory="lots"), r"--run-memory 'lots' is not a size"),
    ("model dir: no config.json", lambda c: options(c, model=str(c.model_dir("no-config", config__json=None))),
     r"has no config.json, so it is not a saved HF model"),
    ("model dir: config.json not JSON", lambda c: options(c, model=str(c.model_dir("bad-config", config__json="{half"))),
     r"config.json is not valid JSON.*damaged"),
    ("model dir: config.json a list", lambda c: options(c, model=str(c.model_dir("list-config", config__json="[1]"))),
     r"config.json holds a JSON list, not an object"),
    ("model dir: truncated safetensors", lambda c: options(c, model=str(c.model_dir(
        "truncated", model__safetensors=(c.tiny.path / "model.safetensors").read_bytes()[:-1000]))),
     r"model.safetensors is truncated: [\d,]+ bytes, where its header needs [\d,]+; fetch or save the model again"),
    ("model dir: safetensors garbage", lambda c: options(c, model=str(c.model_dir("garbage", model__safetensors=b"\x00" * 64))),
     r"model.safetensors does not read as safetensors.*damaged"),
    ("model dir: pickles only", lambda c: options(c, model=str(c.model_dir(
        "pickled", model__safetensors=None, pytorch_model__bin=b"pickle"))),
     r"holds no .safetensors weights \(it holds pytorch_model.bin: pickles, which are never loaded\)"),
    # -- train() arguments, checked before training ------------------------------------------
    ("method: unknown", lambda c: train(c, "lorra"), r"unknown method 'lorra'. Did you mean: lora"),
    ("method: unknown option", lambda c: train(c, rank=4), r"method 'lora' has no option 'rank'"),
    ("method: alpha None", lambda c: train(c, alpha=None), r"method 'lora' options: alpha must be a number, got None"),
    ("method: r a string", lambda c: train(c, r="4"), r"r must be an integer, got '4'"),
    ("method: r zero", lambda c: train(c, r=0), r"lora: r must be a positive integer, got 0"),
    ("method: dropout True", lambda c: train(c, dropout=True), r"dropout must be a number, got True"),
    ("examples: a string", lambda c: train(c, examples="5"), r"examples must be a whole number of training examples \(1\.\.50\), got '5'"),
    ("examples: True", lambda c: train(c, examples=True), r"examples must be a whole number.*got True"),
    ("examples: zero", lambda c: train(c, examples=0), r"has 50 training examples; asked for 0 \(allowed: 1\.\.50\)"),
    ("examples: too many", lambda c: train(c, examples=999), r"asked for 999 \(allowed: 1\.\.50\)"),
    ("layers: negative", lambda c: train(c, "selective", layers=[-1]), r"layer -1 does not exist.*no negative indices.*the last is 23"),
    ("layers: out of range", lambda c: train(c, "selective", layers=[99]), r"layer 99 does not exist.*24 layers, 0\.\.23"),
    ("layers: one int", lambda c: train(c, "surgical-lora", layers=13),
     r"method 'surgical-lora' options: layers must be a list of integers \(layer indices\), e.g. \[13, 15\], got 13 \(an integer\)"),
    ("layers: a string", lambda c: train(c, layers="13"),
     r"method 'lora' options: layers must be a list of integers \(layer indices\), e.g. \[13, 15\], got '13' \(a string\)"),
    ("layers: strings in the list", lambda c: train(c, "selective", layers=["13", "15"]),
     r"layers must be a list of integers .*got \['13', '15'\]: '13' is a string"),
    ("layers: a bool in the list", lambda c: train(c, "selective", layers=[1, True]), r"got \[1, True\]: True is a bool"),
    ("kinds: a number in the list", lambda c: train(c, "selective", layers=[1], kinds=["q_proj", 3]),
     r"method 'selective' options: kinds must be a list of names \(strings\), e.g. \['q_proj'\], got \['q_proj', 3\]: 3 is an integer"),
    ("target_modules: a number", lambda c: train(c, target_modules=7), r"target_modules must be a list of names .*got 7 \(an integer\)"),
    ("method: a recipe setting", lambda c: train(c, learning_rate=1e-3),
     r"^learning_rate is a recipe setting, not an option of method 'lora': train\(\.\.\., recipe=\{'learning_rate': 0\.001\}\)$"),
    ("method: a recipe alias", lambda c: train(c, "full", epochs=2),
     r"^epochs is a recipe setting, not an option of method 'full': train\(\.\.\., recipe=\{'epochs': 2\}\)$"),
    ("method: an instruments setting", lambda c: train(c, nonfinite="record"),
     r"^nonfinite is an instruments setting, not an option of method 'lora': train\(\.\.\., instruments=\{'nonfinite': 'record'\}\)$"),
    ("kinds: misspelt", lambda c: train(c, "selective", layers=[1], kinds=["q_porj"]), r"module kind 'q_porj' does not exist.*Did you mean: q_proj"),
    ("surgical-lora: no layers", lambda c: train(c, "surgical-lora"), r"surgical-lora: `layers` must name the layers to adapt"),
    ("selective: no layers", lambda c: train(c, "selective"), r"selective: `layers` must name at least one layer"),
    ("qlora: bad compute dtype", lambda c: train(c, "qlora", compute_dtype="fp8"), r"qlora: compute_dtype must be one of auto, bfloat16"),
    ("hybrid: warm-up covers the run", lambda c: train(c, "hybrid", freeze_lora_steps=50), r"freeze_lora_steps=50 covers the whole run \(2 steps\)"),
    ("gradual: a stage that never comes", lambda c: train(c, "gradual", every_steps=9, start_layers=0),
     r"the first stage comes at step 9, but the run has only 2 steps"),
    ("recipe: misspelt field", lambda c: train(c, recipe={"warmup_step": 3}), r"recipe has no field 'warmup_step'. Did you mean: warmup_steps"),
    ("recipe: zero lr", lambda c: train(c, recipe={"learning_rate": 0}), r"recipe: learning_rate must be > 0"),
    ("recipe: fractional epochs", lambda c: train(c, recipe={"num_train_epochs": 1.5}), r"recipe: num_train_epochs must be an integer, got 1.5"),
    ("recipe: not a dict", lambda c: train(c, recipe="fast"), r"recipe must be a dict"),
    ("recipe: warm-up past the run", lambda c: train(c, recipe={**RECIPE, "warmup_steps": 5}), r"warmup_steps=5 is not shorter than the run \(2 steps\)"),
    ("instruments: not a dict", lambda c: train(c, instruments="record"), r"instruments must be a dict"),
    ("instruments: bad policy", lambda c: train(c, instruments={"nonfinite": "ignore"}), r"instruments: nonfinite must be one of halt"),
    ("task: unknown", lambda c: train(c, task="stance-lmm"), r"unknown task 'stance-lmm'. Did you mean: stance-lm"),
    ("stance: unknown", lambda c: train(c, stance="curious"), r"unknown stance 'curious'. Did you mean"),
    # -- the helpers' arguments, checked before anything is measured ---------------------------
    ("comparison: unknown metric", lambda c: __import__("stance_harness").check_less(lora(c), lora(c, 3), metric="perplexity"),
     r"^check_less: no metric 'perplexity' to compare. Paired comparisons take behavior_shift, .*forgetting"),
    ("comparison: misspelt metric", lambda c: __import__("stance_harness").assert_less(lora(c), lora(c, 3), metric="forgeting"),
     r"^assert_less: no metric 'forgeting' to compare. Did you mean: forgetting\?"),
    ("comparison: a run with itself", lambda c: __import__("stance_harness").assert_less(lora(c), lora(c)),
     r"^assert_less: `a` and `b` are the same run \(lora-\w+\); a run compared with itself differs by exactly 0"),
    ("comparison: the same run by id", lambda c: __import__("stance_harness").check_greater(
        lora(c), __import__("dataclasses").replace(lora(c), name="copy")), r"^check_greater: `a` and `b` are the same run"),
    ("comparison: a seed twice", lambda c: __import__("stance_harness").check_greater([lora(c), lora(c)], [lora(c, 3), lora(c, 3)]),
     r"^check_greater: `a` holds run lora-\w+ twice; one per seed, each a different run"),
    ("comparison: a dict for a run", lambda c: __import__("stance_harness").check_greater(lora(c), {"a": 1}),
     r"^check_greater: `b` must be a Run \(what train\(\.\.\.\) returns\), or a RunSet \(train\(\.\.\., seeds=N\)\) or list of Runs, one per seed, "
     r"got \{'a': 1\} \(type dict\)"),
    ("comparison: a dict in a list of runs", lambda c: __import__("stance_harness").assert_not_worse([lora(c)], than=[{"a": 1}]),
     r"^assert_not_worse: `than\[0\]` must be a Run"),
    ("helper: the train fixture for a run", lambda c: __import__("stance_harness").assert_ece(_train),
     r"^assert_ece: `run` must be a Run \(what train\(\.\.\.\) returns\), or a RunSet \(train\(\.\.\., seeds=N\)\) or "
     r"list of Runs, one per seed, got the `train` fixture itself \(a function\); "
     r"call it: run = train\('lora', \.\.\.\)$"),
    ("helper: a dict among the seeds of one run", lambda c: __import__("stance_harness").check_no_forgetting([lora(c), {"a": 1}]),
     r"^check_no_forgetting: `run\[1\]` must be a Run \(what train\(\.\.\.\) returns\), or a RunSet"),
    ("helper: ECE against itself", lambda c: __import__("stance_harness").assert_ece_not_worse(lora(c), than=lora(c)),
     r"^assert_ece_not_worse: `run` and `than` are the same run"),
    ("helper: profiles of one run", lambda c: __import__("stance_harness").check_layer_profiles_agree(lora(c), lora(c)),
     r"^check_layer_profiles_agree: `a` and `b` are the same run"),
    ("assert_all: an assert_ result", lambda c: __import__("stance_harness").assert_all([None]),
     r"^assert_all: `results\[0\]` must be a CheckResult \(what a check_X helper returns\), got None \(type NoneType\); "
     r"use check_X"),
    # -- stance files --------------------------------------------------------------------------
    ("stance: not UTF-8", lambda c: __import__("stance_harness.stances").stances.load_stance_file(
        c.file("latin.yaml", "name: latin\ndescription: caf\xe9\n".encode("latin-1"))), r"latin.yaml: field '<file>': is not UTF-8 text"),
    ("stance: an alias bomb", lambda c: __import__("stance_harness.stances").stances.load_stance_file(c.file(
        "bomb.yaml", "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nmarkers: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n")),
     r"bomb.yaml: field '<yaml>': is not valid YAML: .*may not use YAML aliases"),
    ("stance: invalid YAML", lambda c: __import__("stance_harness.stances").stances.load_stance_file(c.file("broken.yaml", "name: [unclosed\n")),
     r"broken.yaml: field '<yaml>': is not valid YAML"),
    ("stance: misspelt key", lambda c: __import__("stance_harness.stances").stances.load_stance_file(
        c.file("demo.yaml", GOOD_STANCE.replace("curious-uncertainty", "demo").replace("markers:", "marker:"))),
     r"field 'marker': is not a known key.*Did you mean: markers"),
    ("stance: missing file", lambda c: __import__("stance_harness.stances").stances.load_stance_file(c.root / "none.yaml"), r"stance file .*none.yaml does not exist"),
    ("stance: the same name twice", lambda c: __import__("stance_harness.stances").stances.load_stance(
        "curious-uncertainty", [str(c.stance_yaml("curious-uncertainty", GOOD_STANCE).parent)]),
     r"stance 'curious-uncertainty' is defined in 2 places: .*stances-extra/curious-uncertainty.yaml, .*Rename one, or name the file"),
    # -- adapters, reports, baselines, the run store, verdict records ----------------------------
    ("adapter: no config", lambda c: __import__("stance_harness.runs.adapters").runs.adapters.read_adapter(
        c.file("empty-adapter/notes.txt", "x").parent), r"--adapter .*empty-adapter: no adapter_config.json there"),
    ("adapter: no such directory", lambda c: options(c, adapter=[str(c.root / "no-adapter")]),
     r"^--adapter .*no-adapter: the directory does not exist \(/"),
    ("adapter: a file", lambda c: options(c, adapter=[str(c.file("adapter-file", "x"))]),
     r"^--adapter .*adapter-file: it is a file; give the directory that save_pretrained wrote"),
    ("adapter: config not JSON", lambda c: (c.file("adapter-a/adapter_model.safetensors", b"x"),
                                            __import__("stance_harness.runs.adapters").runs.adapters.read_adapter(c.file("adapter-a/adapter_config.json", "{no").parent)),
     r"adapter_config.json is not valid JSON"),
    ("adapter: a pickle", lambda c: (c.file("adapter-b/adapter_config.json", "{}"), c.file("adapter-b/adapter_model.bin", b"x"),
                                     __import__("stance_harness.runs.adapters").runs.adapters.read_adapter(c.root / "adapter-b")),
     r"no adapter_model.safetensors \(it holds adapter_model.bin, a pickle, which is refused\)"),
    ("adapter: prompt learning", lambda c: (c.file("adapter-c/adapter_config.json", json.dumps(
        {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 8})),
        c.file("adapter-c/adapter_model.safetensors", b"x"),
        __import__("stance_harness.runs.adapters").runs.adapters.read_adapter(c.root / "adapter-c")),
     r"a PROMPT_TUNING adapter is prompt learning: it trains virtual tokens, not a weight update"),
    ("adapter: unknown peft type", lambda c: (c.file("adapter-d/adapter_config.json", json.dumps({"peft_type": "LORAA"})),
                                              c.file("adapter-d/adapter_model.safetensors", b"x"),
                                              __import__("stance_harness.runs.adapters").runs.adapters.read_adapter(c.root / "adapter-d")),
     r"adapter-d: adapter_config.json: unknown peft_type 'LORAA'.*Did you mean: LORA"),
    ("adapter: a checkpoint as a pickle", lambda c: (c.file("ckpt/config.json", "{}"), c.file("ckpt/pytorch_model.bin", b"x"),
                                                     __import__("stance_harness.runs.adapters").runs.adapters.read_adapter(c.root / "ckpt")),
     r"--adapter .*ckpt: .*ckpt holds no .safetensors weights \(it holds pytorch_model.bin: pickles, which are never loaded\)"),
    ("adapter: two with one NAME", lambda c: (c.file("one/adapter_config.json", "{}"), c.file("two/config.json", "{}"),
                                              options(c, adapter=[f"v2={c.root / 'one'}", f"v2={c.root / 'two'}"])),
     r"^--adapter v2=.*one and v2=.*two would both name their metrics 'v2'; give each its own with NAME=PATH"),
    ("stance: unknown --stance", lambda c: options(c, stance="curious-uncertanity"),
     r"curious-uncertanity.*Did you mean: curious-uncertainty"),
    ("adapter: NAME=PATH with a bad name", lambda c: __import__("stance_harness.runs.adapters").runs.adapters.read_adapter("v2.1=adapters/x"),
     r"--adapter v2.1=adapters/x: 'v2.1' is not a NAME for NAME=PATH; use letters, digits, '_' and '-'"),
    ("baseline: not JSON", lambda c: (c.file("reports/baselines/broken.json", "{half"),
                                      __import__("stance_harness.report.store").report.store.load_baseline(c.root / "reports", "broken")),
     r"baseline .*broken.json is not valid JSON"),
    ("report source: unknown", lambda c: __import__("stance_harness.report.store").report.store.load_source("20990101-000000-zzzz", c.root / "reports"),
     r"no report, baseline or file '20990101-000000-zzzz'"),
    ("run store: unknown key", lambda c: __import__("stance_harness.runs.runstore").runs.runstore.RunStore(c.root / "store").describe("lora-0"),
     r"no run store entry 'lora-0'"),
    ("verdict record: not JSON", lambda c: (c.file("suites-x/verdicts/tiny-qwen2.json", "{half"),
                                            __import__("stance_harness.report.verdicts").report.verdicts.VerdictBook("tiny-qwen2").recorded(
                                                c.root / "suites-x" / "test_a.py", "suites-x/test_a.py::test")),
     r"the verdict record .*tiny-qwen2.json is unreadable.*--record-verdicts"),
]


def test_the_catalogue_holds_at_least_sixty_bad_inputs():
    assert len(CASES) >= 60 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name, make, message", CASES, ids=[name for name, _, _ in CASES])
def test_each_bad_input_gets_a_clear_message(ctx, name, make, message):
    with pytest.raises(HarnessError) as info:
        make(ctx)
    assert re.search(message, str(info.value), re.S), str(info.value)


@pytest.mark.parametrize("args, message", [
    (("--reports-dir", "README.md"), "--reports-dir *README.md: it is a file, not a directory"),
    (("--model-args", "device=cuda"), "--model-args device=cuda: this machine has no CUDA device*"),
    (("--stance-dir", "nowhere"), "--stance-dir nowhere: no such directory"),
    (("--adapter", "no-such-adapter"), "--adapter no-such-adapter: the directory does not exist (*no-such-adapter)"),
])
def test_a_bad_option_stops_a_real_session_at_once(pytester, args, message):
    pytester.makefile(".md", README="a file")
    pytester.makepyfile(test_x="def test_x(train):\n    train('lora')\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: stance-harness: " + message])
    assert "Traceback" not in result.stderr.str() and not (pytester.path / "reports").exists()


def test_a_helper_checks_its_arguments_before_it_measures_anything(ctx):
    import dataclasses

    from stance_harness import check_greater, check_less, check_no_forgetting

    # copies measure afresh (their measurements start empty), so any measurement would show
    a, b = (dataclasses.replace(lora(ctx), run_id=name) for name in ("a-copy", "b-copy"))
    for bad in (lambda: check_less(a, b, metric="forgeting"), lambda: check_greater(a, a),
                lambda: check_greater(a, {"a": 1}), lambda: check_no_forgetting(_train)):
        with pytest.raises(HarnessError):
            bad()
    assert a.measurements == {} and b.measurements == {}
    check_less(a, b, metric="forgetting")  # the same call, well formed, does measure
    assert "forgetting" in a.measurements and "forgetting" in b.measurements


HELPERS = sorted(name for name in __import__("stance_harness").__all__
                 if name.startswith(("check_", "assert_")) and name != "assert_all")


@pytest.mark.parametrize("name", HELPERS)
def test_every_helper_refuses_the_train_fixture_where_a_run_belongs(name):
    import inspect

    import stance_harness

    helper = getattr(stance_harness, name)
    first, *others = inspect.signature(helper).parameters.values()
    required = {p.name: [0] for p in others if p.default is inspect.Parameter.empty}  # layers=[0]
    with pytest.raises(HarnessError) as info:
        helper(_train, **required)
    assert str(info.value).startswith(f"{name}: `{first.name}` must be a Run (what train(...) returns)")
    assert "got the `train` fixture itself (a function); call it" in str(info.value)
