"""The method registry end to end: a method defined in a test module runs through the real CLI (Ray
workers, Parquet, the report) as its own setting, and every bad method input stops in pre-flight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.methods import METHODS
from pipeline.recipe import BASELINE, Recipe
from pipeline.run import main, plan_run
from pipeline.sweep import ConfigError

PLUGIN = "plugins=[tests.pipeline.toy_method]"
EVAL = [
    "eval.perplexity=[{name:wikitext2,path:eval/wikitext-2-raw/wiki.test.raw,"
    "context_length:64,stride:64,max_tokens:512}]",
    "eval.tasks=[]",
    "eval.batch_size=8",
]


def test_rtn_is_registered_and_describes_itself():
    assert "rtn" in METHODS and METHODS["rtn"].params is None and not METHODS["rtn"].needs_calibration


def test_sixteen_bits_is_the_one_baseline_whatever_the_method():
    import tests.pipeline.toy_method  # noqa: F401  (registers "toy" in this process)

    spelled = [
        Recipe(bits=16),
        Recipe(method="toy", dtype="fp", bits=16, block_size=None, outlier_fraction=0.1),
    ]
    assert all(r == BASELINE and r.is_baseline and r.spec is None for r in spelled)
    assert (BASELINE.method, BASELINE.dtype, BASELINE.name) == ("none", "none", "16-bit")


def test_recipe_fills_and_checks_method_parameters():
    import tests.pipeline.toy_method  # noqa: F401

    assert Recipe(method="toy", dtype="nf").params == (("scale", 0.9),)
    assert Recipe(method="toy", dtype="nf", params=(("scale", 0.5),)).params_json == '{"scale":0.5}'
    with pytest.raises(KeyError, match="did you mean 'scale'"):
        Recipe(method="toy", dtype="nf", params=(("scal", 0.5),))
    with pytest.raises(ValueError, match="scale=2"):
        Recipe(method="toy", dtype="nf", params=(("scale", 2.0),))
    with pytest.raises(ValueError, match="takes no parameters"):
        Recipe(method="rtn", params=(("scale", 0.5),))


def test_toy_quantizes_like_its_reference(tiny_model_dir: Path):
    """The registered toy equals its definition written out here, matrix by matrix."""
    import tests.pipeline.toy_method  # noqa: F401
    from kernels import QuantSpec, fake_quantize
    from pipeline.models import linear_weights, load_model, quantize_model_, snapshot_weights

    model, _ = load_model_ref(tiny_model_dir, load_model)
    before = {n: w.clone() for n, w in linear_weights(model).items()}
    untouched = {n: p for n, p in snapshot_weights(model).items() if n not in before}
    report = quantize_model_(model, Recipe(method="toy", dtype="nf", bits=3, params=(("scale", 0.5),)))
    for name, w in linear_weights(model).items():
        assert torch.equal(w, fake_quantize(before[name] * 0.5, QuantSpec("nf", 3, 64))), name
    for name, p in model.named_parameters():
        if name in untouched:
            assert torch.equal(p, untouched[name]), name
    rtn = quantize_model_(load_model_ref(tiny_model_dir, load_model)[0], Recipe(dtype="nf", bits=3))
    assert report == rtn  # same storage: a method that changes values, not bits


def load_model_ref(path: Path, load_model):  # type: ignore[no-untyped-def]
    from pipeline.specs import ModelRef

    return load_model(ModelRef(name_or_path=str(path)), "cpu")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["quant.method=gtpq"], "unknown quantization method 'gtpq'"),
        ([PLUGIN, "quant.method=toy", "quant.dtype=fp"], "does not take dtype='fp'"),
        ([PLUGIN, "quant.method=toy", "quant.bits=5"], "does not take bits=5"),
        ([PLUGIN, "quant.method=toy", "quant.params={scal:0.5}"], "did you mean 'scale'"),
        (["plugins=[no_such_module_here]"], "plugins: cannot import 'no_such_module_here'"),
        (["results_root=a,b"], "results_root holds for the whole run"),
        (["ray.max_attempts=2,3"], "ray holds for the whole run"),
    ],
)
def test_bad_method_input_stops_before_anything_runs(
    tmp_path: Path, tiny_model_dir: Path, overrides, expected
):
    base = [f"model.name_or_path={tiny_model_dir}", f"results_root={tmp_path / 'r'}", *EVAL]
    with pytest.raises(ConfigError, match=expected):
        plan_run([*base, *overrides])
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_method_from_a_test_module_runs_through_the_cli_as_its_own_setting(
    tmp_path: Path, tiny_model_dir: Path
):
    from pipeline.results import load_results

    root = tmp_path / "results"
    argv = [
        "-m",
        PLUGIN,
        "quant.method=rtn,toy",
        "quant.dtype=nf",
        "quant.bits=3,4,16",
        f"model.name_or_path={tiny_model_dir}",
        f"results_root={root}",
        "study=toy",
        "report=true",
        "ray.num_cpus=2",
        *EVAL,
    ]
    assert main(argv) == 0
    rows = load_results(root / "toy")
    jobs = rows.drop_duplicates("job_key")
    assert sorted(zip(jobs.method, jobs.bits, strict=True)) == [
        ("none", 16), ("rtn", 3), ("rtn", 4), ("toy", 3), ("toy", 4)
    ]  # fmt: skip
    toy = jobs[jobs.method == "toy"]
    assert set(toy.method_params) == {"{}"}  # the default scale: the column holds what differs
    ppl = rows[rows.metric == "perplexity"].set_index(["method", "bits"])["value"]
    assert ppl[("toy", 3)] != ppl[("rtn", 3)]  # the toy's values reached the evaluation
    assert set(rows.context_length.dropna()) == {64}
    summary = (root / "toy" / "report" / "summary.md").read_text()
    html = (root / "toy" / "report" / "report.html").read_text()
    assert "toy" in summary and "toy" in html
