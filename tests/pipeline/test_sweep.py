"""End to end through the real Ray (num_cpus=2), real lm-eval and real Parquet, on tiny saved models.

One Ray cluster per module. The sweep runs twice: a subset first (as if a run had been interrupted),
then the whole grid, during which one worker kills itself (a kill -9 mid-job) and a corrupt (NaN)
checkpoint fails its job while the rest complete. Every other check reads those results.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.results import COLUMNS, STATUS_FAILED, STATUS_OK, load_results
from pipeline.run import Plan, execute, main, plan_cells, plan_run
from pipeline.sweep import ConfigError, expand, plan_sweep
from pipeline.worker import ModelWorker

EVAL = [
    "eval.perplexity=[{name:wikitext2,path:eval/wikitext-2-raw/wiki.test.raw,"
    "context_length:128,stride:128,max_tokens:1024}]",
    "eval.tasks=[lambada_openai]",
    "eval.limit=4",
    "eval.batch_size=8",
]
GRID = ["quant.dtype=int,fp,nf", "quant.bits=3,4,16", "quant.block_size=64,null"]
N_GOOD_JOBS = 3 * 2 * 2 + 1  # the 16-bit cells collapse into one baseline


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never join a cluster left running
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corrupt checkpoint: the tiny model with one NaN weight (as a diverged training run leaves)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = math.nan
    out = tmp_path_factory.mktemp("nan-llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


class DyingWorker(ModelWorker):
    """Dies like a kill -9 the first time it is handed the 3-bit nf/block-64 job (a marker file says so)."""

    def run(self, job):  # type: ignore[no-untyped-def]
        marker = self._results_root / ".died-once"
        cell = (job.recipe.dtype, job.recipe.bits, job.recipe.block_size)
        if cell == ("nf", 3, 64) and not marker.exists():
            marker.touch()
            os._exit(1)
        return super().run(job)


def cells(overrides: list[str]) -> list[Config]:
    return expand(plan_sweep(overrides, multirun=True))


def common(root: Path) -> list[str]:
    return [*EVAL, f"results_root={root}", "study=e2e"]


@pytest.fixture(scope="module")
def swept(ray_cluster, tiny_model_dir: Path, nan_model_dir: Path, tmp_path_factory) -> dict:
    """Run a subset, then the whole grid plus the corrupt model's baseline; return both runs."""
    root = tmp_path_factory.mktemp("results")
    base = [*common(root), f"model.name_or_path={tiny_model_dir}"]
    subset = plan_run([*base, "quant.dtype=int,fp,nf", "quant.bits=4", "quant.block_size=64,null"])
    first = execute(subset)
    whole_cells = cells([*base, *GRID]) + cells([*common(root), f"model.name_or_path={nan_model_dir}",
                                                 "quant.bits=16"])  # fmt: skip
    whole = plan_cells(whole_cells)
    second = execute(whole, worker_cls=DyingWorker)
    return {"root": root, "subset": subset, "first": first, "whole": whole, "second": second}


def test_subset_then_whole_runs_only_what_is_missing(swept):
    subset: Plan = swept["subset"]
    assert len(subset.to_run) == 6 and swept["first"].failed == 0
    whole: Plan = swept["whole"]
    assert len(whole.jobs) == N_GOOD_JOBS + 1
    assert whole.skipped == 6 and len(whole.to_run) == N_GOOD_JOBS + 1 - 6
    assert {j.key for j in subset.to_run} <= {j.key for j in whole.jobs}
    assert not {j.key for j in subset.to_run} & {j.key for j in whole.to_run}


def test_every_key_present_once_and_no_duplicate_rows(swept):
    df = load_results(swept["root"] / "e2e")
    assert set(df.job_key) == {j.key for j in swept["whole"].jobs}
    assert not df.duplicated(["job_key", "task", "metric"]).any()
    files = list((swept["root"] / "e2e").glob("*.parquet"))
    assert len(files) == N_GOOD_JOBS + 1
    assert not list((swept["root"] / "e2e").glob(".tmp-*"))


def test_killed_worker_jobs_rerun_elsewhere(swept):
    assert (swept["root"] / ".died-once").exists()
    assert swept["second"].retried >= 1
    df = load_results(swept["root"] / "e2e")
    nf3 = df[(df.dtype == "nf") & (df.bits == 3) & (df.block_size == 64)]
    assert set(nf3.status) == {STATUS_OK}


def test_corrupt_model_fails_alone_and_the_sweep_goes_on(swept, nan_model_dir: Path):
    second = swept["second"]
    assert second.failed == 1 and second.done == len(swept["whole"].to_run)
    df = load_results(swept["root"] / "e2e")
    failed = df[df.status == STATUS_FAILED]
    assert len(failed) == 1 and failed.iloc[0].model == str(nan_model_dir)
    assert "non-finite" in failed.iloc[0].error and "nan" in failed.iloc[0].error.lower()
    ok = df[df.status == STATUS_OK]
    assert ok.job_key.nunique() == N_GOOD_JOBS
    assert "1 failed" in second.summary() and "rerun_failed=true" in second.summary()


def test_rows_fill_every_column(swept):
    df = load_results(swept["root"] / "e2e")
    ok = df[df.status == STATUS_OK]
    assert set(ok.task) == {"wikitext2", "lambada_openai"}
    may_be_null = {"block_size", "exponent_bits", "stderr", "error", "n_examples", "max_tokens", "eval_limit"}
    may_be_null |= {"calibration"}  # rtn calibrates nothing
    may_be_null |= {"recover_params", "recover_s"}  # no recovery adapters trained
    may_be_null |= {"allocation"}  # uniform recipes: every layer the same
    may_be_null |= {"train_tokens"}  # not a ladder member (a saved model folder)
    may_be_null |= {"unit_sums", "unit_counts"}  # bits_per_byte has none (checked below)
    per_task = {"scorer", "eval_limit", "context_length", "stride", "max_tokens"}  # set by the row's task
    for column in set(COLUMNS) - may_be_null - per_task:
        assert ok[column].notna().all(), column
    with_units = ok[ok.metric != "bits_per_byte"]
    assert with_units.unit_sums.notna().all() and with_units.unit_counts.notna().all()
    ppl, task = ok[ok.task == "wikitext2"], ok[ok.task == "lambada_openai"]
    assert set(ppl.context_length) == {128} and set(ppl.stride) == {128} and set(ppl.max_tokens) == {1024}
    assert ppl.scorer.isna().all() and task.context_length.isna().all()
    assert set(task.scorer) == {"fast"} and set(task.eval_limit) == {4}  # scorer=auto on a llama: fast
    assert ok[ok.dtype == "fp"].exponent_bits.notna().all()
    assert (ok.load_s >= 0).all() and (ok.eval_s > 0).all()
    assert {"torch", "transformers", "kbitscale"} <= set(__import__("json").loads(ok.versions.iloc[0]))
    quantized = ok[ok.bits < 16]
    assert (quantized.total_model_bits < ok[ok.bits == 16].total_model_bits.iloc[0]).all()


def test_sixteen_bit_cell_is_the_unquantized_model(swept, tiny_model_dir: Path):
    import torch

    from pipeline.config import eval_spec
    from pipeline.evals.evaluate import Evaluator
    from pipeline.models import load_model

    cell = cells([*common(swept["root"]), f"model.name_or_path={tiny_model_dir}", "quant.bits=16"])[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's thread count, so the float sums run in the same order
    try:
        model, tokenizer = load_model(cell_model_ref(cell), "cpu")
        direct = {
            (m.task, m.metric): m.value for m in Evaluator(model, tokenizer, eval_spec(cell.eval)).run()
        }
    finally:
        torch.set_num_threads(threads)
    df = load_results(swept["root"] / "e2e")
    base = df[(df.bits == 16) & (df.status == STATUS_OK)]
    assert len(base.job_key.unique()) == 1 and set(base.dtype) == {"none"}
    for row in base.itertuples():
        assert row.value == direct[(row.task, row.metric)], (row.task, row.metric)


def cell_model_ref(cell: Config):
    from pipeline.config import model_ref

    return model_ref(cell.model)


def test_rerun_skips_everything_unless_failed_are_asked_for(swept, tiny_model_dir, nan_model_dir):
    base = [*common(swept["root"]), f"model.name_or_path={tiny_model_dir},{nan_model_dir}", "quant.bits=16"]
    again = plan_run(base)
    assert again.to_run == () and again.skipped == 2
    assert execute(again).done == 0
    retry = plan_run([*base, "rerun_failed=true"])
    assert [j.model.name_or_path for j in retry.to_run] == [str(nan_model_dir)]


BAD_INPUTS = [
    (["quant.bits=1"], "bits"),
    (["quant.dtype=foo"], "foo"),
    (["quant.block_size=0"], "block_size"),
    (["model.name_or_path=/no/such/model"], "/no/such/model"),
    (["eval.tasks=[no_such_task]"], "no_such_task"),
    (["quant.outlier_fraction=1.5"], "outlier_fraction"),
    (["model=ladder/tiny", "model.name_or_path=ladder:nope"], "nope"),
    (["study=../escape"], "study"),
    (
        ["eval.scorer=fastest"],
        "unknown eval.scorer 'fastest'; did you mean 'fast'? (allowed: auto, hflm, fast)",
    ),
    (["eval=paper"], "context_length=1024 exceeds"),  # the test model has 512 positions (config.json)
]


@pytest.mark.parametrize(("overrides", "needle"), BAD_INPUTS)
def test_bad_input_fails_before_anything_runs(overrides, needle, tiny_model_dir, tmp_path, capsys):
    root = tmp_path / "results"
    argv = [f"model.name_or_path={tiny_model_dir}", f"results_root={root}", *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration") and needle in err
    assert not root.exists()


def test_ladder_context_checked_before_training(tmp_path, capsys):
    root = tmp_path / "results"
    assert main(["model=ladder/h100", "eval=paper", f"results_root={root}"]) == 2
    assert "context_length=1024 exceeds 'ladder:h100''s 512 positions" in capsys.readouterr().err
    assert not root.exists()


def test_every_bad_value_in_one_message(tiny_model_dir, tmp_path):
    overrides = [
        f"model.name_or_path={tiny_model_dir},/no/such/model",
        "quant.bits=1,4",
        "quant.dtype=int,foo",
        "quant.block_size=0",
        f"results_root={tmp_path / 'r'}",
    ]
    with pytest.raises(ConfigError) as info:
        plan_run(overrides)
    text = str(info.value)
    for needle in ("/no/such/model", "bits", "foo", "block_size"):
        assert needle in text
    assert "int" in text and "nf" in text  # the allowed data types are named
    assert not (tmp_path / "r").exists()


def test_every_bad_field_of_one_cell_is_named(tiny_model_dir, tmp_path, capsys):
    argv = [f"model.name_or_path={tiny_model_dir}", f"results_root={tmp_path}", "quant.bits=1"]
    assert main([*argv, "quant.dtype=foo", "quant.block_size=0"]) == 2
    err = capsys.readouterr().err
    assert "bits=1" in err and "'foo'" in err and "block_size=0" in err


def test_demo_is_the_default_and_plans_offline(tmp_path, monkeypatch):
    from pipeline.run import parse_argv

    monkeypatch.setenv("KBIT_CACHE", str(tmp_path / "cache"))  # no ladder trained: one model counted
    assert parse_argv([]) == (True, False, ["+sweep=demo"])
    plan = plan_run(["+sweep=demo", "dry_run=true", f"results_root={tmp_path}"])
    assert plan.n_cells == 76 and len(plan.jobs) == 76 and len(plan.to_run) == 76
    assert {j.study for j in plan.jobs} == {"demo"}
    assert "not trained yet" in plan.jobs[0].model_label and not (tmp_path / "cache" / "ladders").exists()
