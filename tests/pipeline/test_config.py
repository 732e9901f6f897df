"""Every config in conf/ and sweeps/ composes; overrides expand like Hydra's multirun; bad overrides fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import (
    GROUPS,
    PROJECT_ROOT,
    SWEEPS_DIR,
    Config,
    eval_spec,
    group_options,
    load_config,
    project_path,
    replace_path,
)
from pipeline.sweep import ConfigError, expand, plan_sweep, sweep_names

DTYPES = ["int", "fp", "nf", "quantile", "dynamic"]
REQUIRED = {"model=hf": ["model.name_or_path=some/model"]}


ALL_OPTIONS = [f"{group}={option}" for group in GROUPS for option in group_options(group)]


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), group


@pytest.mark.parametrize("override", ALL_OPTIONS)
def test_every_conf_option_composes(override: str):
    cfg = load_config([override, *REQUIRED.get(override, [])])
    assert isinstance(cfg, Config)
    assert cfg.model.name_or_path
    if override.startswith("eval="):
        spec = eval_spec(cfg.eval)
        assert spec.perplexity or spec.tasks
        assert Path(spec.data_root).is_absolute()


@pytest.mark.parametrize("name", sweep_names())
def test_every_sweep_composes(name: str):
    cells = expand(plan_sweep([f"+sweep={name}"], multirun=True))
    assert cells and all(isinstance(c, Config) for c in cells)
    assert {c.study for c in cells} == {name}


def test_named_sweeps_exist():
    assert {"paper", "smoke", "demo"} <= set(sweep_names())
    assert all(p.suffix == ".yaml" for p in SWEEPS_DIR.iterdir() if p.is_file())


def test_defaults_score_wikitext2_slice_offline():
    cfg = load_config([])
    assert [p.name for p in cfg.eval.perplexity] == ["wikitext2"]
    assert cfg.eval.perplexity[0].max_tokens is not None
    assert cfg.model.name_or_path == "ladder:tiny"
    assert cfg.results_root == "results" and cfg.ray.address is None


@pytest.mark.parametrize(
    ("override", "want"), [([], None), (["eval.compile=true"], True), (["eval.compile=false"], False)]
)
def test_eval_compile_reaches_the_eval_spec(override, want):
    assert eval_spec(load_config(override).eval).compile is want


def test_paths_are_relative_to_project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    spec = eval_spec(load_config([]).eval)
    assert Path(spec.data_root) == (PROJECT_ROOT / "../shared/data").resolve()
    assert project_path("results") == PROJECT_ROOT / "results"
    assert project_path("/abs/x") == Path("/abs/x")


def test_composition_makes_no_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    expand(plan_sweep(["quant.bits=3,4", "study=x"], multirun=True))
    assert list(tmp_path.iterdir()) == []


def test_issue_grid_expands_every_cell():
    overrides = [
        "quant.dtype=int,fp,nf,quantile,dynamic",
        "quant.bits=range(3,9)",
        "quant.block_size=64,1024,null",
        "model.name_or_path=a/b,c/d",
        "study=x",
    ]
    cells = expand(plan_sweep(overrides, multirun=True))
    assert len(cells) == 5 * 6 * 3 * 2
    assert {c.quant.bits for c in cells} == set(range(3, 9))
    assert {c.quant.block_size for c in cells} == {64, 1024, None}
    assert {c.quant.dtype for c in cells} == set(DTYPES)
    assert {c.model.name_or_path for c in cells} == {"a/b", "c/d"} and {c.study for c in cells} == {"x"}


def test_demo_grid_has_the_stated_size():
    cells = expand(plan_sweep(["+sweep=demo"], multirun=True))
    quantized = [c for c in cells if c.quant.bits != 16]
    assert len(quantized) == 5 * 5 * 3 and len(cells) == 76
    assert {c.quant.bits for c in cells} == {3, 4, 5, 6, 8, 16}
    assert {p.name for p in cells[0].eval.perplexity} == {"heldout"}  # in domain for the ladder
    assert {c.model.name_or_path for c in cells} == {"ladder:demo"}
    assert all(c.report for c in cells) and not load_config([]).report


def test_paper_grid_is_the_union_of_its_grids():
    cells = expand(plan_sweep(["+sweep=paper", "model.name_or_path=a/b,c/d"], multirun=True))
    per_model = 5 * 6 * 5 + 1 + 5 * 2 * 5
    assert len(cells) == 2 * per_model
    proxy = [c for c in cells if c.quant.outlier_fraction > 0]
    assert {c.quant.bits for c in proxy} == {3, 4} and {c.quant.outlier_fraction for c in proxy} == {0.02}
    assert set(cells[0].eval.tasks) == {"lambada_openai", "piqa", "hellaswag", "winogrande"}


def test_command_line_wins_over_sweep_file():
    cells = expand(plan_sweep(["+sweep=paper", "quant.bits=4", "study=mine"], multirun=True))
    assert {c.quant.bits for c in cells} == {4} and {c.study for c in cells} == {"mine"}


def test_group_choice_can_be_swept():
    cells = expand(plan_sweep(["eval=demo,smoke", "quant.bits=3,4"], multirun=True))
    assert len(cells) == 4
    assert {c.eval.perplexity[0].name for c in cells} == {"heldout", "wikitext2"}  # demo, smoke


def test_replace_path_sets_nested_fields():
    cfg = load_config([])
    new = replace_path(cfg, {"quant.bits": 3, "study": "s", "model.torch_dtype": "float32"})
    assert (new.quant.bits, new.study, new.model.torch_dtype) == (3, "s", "float32")
    assert cfg.quant.bits == 4 and new.eval is cfg.eval


TWO_SETS = "eval.perplexity=[{name:h,path:'corpus:heldout'},{name:w,path:eval/wikitext-2-raw/wiki.test.raw}]"


def test_replace_path_sets_a_field_of_one_list_item():
    cfg = load_config(["eval=demo", TWO_SETS])
    new = replace_path(cfg, {"eval.perplexity.1.max_tokens": 2048, "eval.perplexity.0.stride": 128})
    assert [(p.stride, p.max_tokens) for p in new.eval.perplexity] == [
        (128, cfg.eval.perplexity[0].max_tokens),
        (cfg.eval.perplexity[1].stride, 2048),
    ]
    assert cfg.eval.perplexity[1].max_tokens != 2048 and new.eval.perplexity is not cfg.eval.perplexity
    assert new == load_config(
        ["eval=demo", TWO_SETS, "eval.perplexity.1.max_tokens=2048", "eval.perplexity.0.stride=128"]
    )


@pytest.mark.parametrize(
    ("overrides", "multirun", "needle"),
    [
        (["quant.bits=foo,3"], True, "quant.bits=foo"),
        (["quant.block_size=big"], True, "block_size"),
        (["model=nope"], False, "allowed: ['hf', 'ladder/h100', 'ladder/h100-tokens', 'ladder/tiny'"),
        (["quant.blocksize=3"], False, "quant.blocksize"),
        (["quant.bits=3,4"], False, "add -m"),
        (["+sweep=nope"], True, f"allowed: {sorted(p.stem for p in SWEEPS_DIR.glob('*.yaml'))}"),
        (["quant.bits=interval(3,4)"], True, "interval"),
        (["quant.bits=="], True, "quant.bits"),
        (["eval.compile=maybe"], False, "eval.compile=maybe: Value 'maybe' is not a valid bool"),
    ],
)
def test_bad_overrides_fail_with_one_clear_message(overrides, multirun, needle):
    with pytest.raises(ConfigError) as info:
        expand(plan_sweep(overrides, multirun=multirun))
    assert needle in str(info.value)


def test_all_type_errors_reported_together():
    with pytest.raises(ConfigError) as info:
        expand(plan_sweep(["quant.bits=foo,bar", "quant.centering=maybe", "eval=wikitext2"], multirun=True))
    assert len(info.value.problems) == 3
