"""Results (one row per job, task and metric) -> one row per job, with labels for curves.

`tidy_jobs` is the table every other analysis step reads: job attributes (model, family, size,
quantization method and setting, scope, bits per parameter, total model bits), the metric columns
named in `analysis.metrics`, and two labels: `setting` (the quantization setting without the bit
width, e.g. 'fp e2 B64 proxy 2%') and `curve` (bit width + setting, e.g. '4-bit fp e2 B64').

A setting names its method unless it is round-to-nearest ('gptq int B64', with the method's own
parameters where it has any: 'gptq(damp=0.01) int B64') and a wider quantization scope ('+emb',
'+head'), so rtn studies keep their labels and any other method or scope is a setting of its own.
The 16-bit baseline is one setting, '16-bit', shared by all methods.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.eval_variants import variant_suffixes
from analysis.metrics import MEAN_ACC, is_metric_column, se_column, split_variant, variant_column

log = logging.getLogger(__name__)

PAPER_TASKS: tuple[str, ...] = ("lambada_openai", "piqa", "hellaswag", "winogrande")
BASELINE_SETTING = "16-bit"
BASELINE_BITS = 16
DEFAULT_METHOD, BASELINE_METHOD, NO_PARAMS = "rtn", "none", "{}"
SCOPE_LABELS = {"quantize_embeddings": "+emb", "quantize_lm_head": "+head"}  # setting label parts
SCOPE_COLUMNS: tuple[str, ...] = tuple(SCOPE_LABELS)
METHOD_COLUMNS: tuple[str, ...] = ("method", "method_params", *SCOPE_COLUMNS)  # optional in the input
JOB_COLUMNS: tuple[str, ...] = (
    "job_key", "study", "model", "model_family", "n_params", "n_quantized_params", "n_kept_params",
    "method", "method_params", "dtype", "bits", "block_size", "exponent_bits", "outlier_fraction",
    "centering", "quantize_embeddings", "quantize_lm_head", "bits_per_param", "total_model_bits",
)  # fmt: skip
OPTIONAL_JOB_COLUMNS: tuple[str, ...] = ("train_tokens",)  # kept where some job has a value
# mixed allocation and recovery (schema 4-5; see analysis.frontier): kept where the results have them
VARIANT_COLUMNS: tuple[str, ...] = ("allocation", "recover", "recover_params", "adapter_bits")
NO_RECOVER = "none"
ALLOCATION_PARAMS = frozenset({"allocation", "target_bits", "candidates", "sensitivity"})  # in method_params
REQUIRED_COLUMNS: tuple[str, ...] = (
    *(c for c in JOB_COLUMNS if c not in METHOD_COLUMNS), "task", "metric", "value", "stderr", "status",
    "error",
)  # fmt: skip
PPL_PREFIXES = {"perplexity": "ppl_", "nats_per_token": "ce_", "bits_per_byte": "bpb_", "kl_to_16bit": "kl_"}


def check_results(raw: pd.DataFrame) -> pd.DataFrame:
    """`raw` with the method and scope columns filled where absent or null (see `with_method`).

    Raises:
        AnalysisError: `raw` is empty or lacks a column of the results schema.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise AnalysisError(
            f"results lack columns {missing}; expected the pipeline.results SCHEMA "
            f"columns {list(REQUIRED_COLUMNS)}"
        )
    if raw.empty:
        raise AnalysisError("results hold no rows")
    return with_method(raw)


def with_method(raw: pd.DataFrame) -> pd.DataFrame:
    """A copy of `raw` with `METHOD_COLUMNS` filled where absent or null (results written before
    they existed, synthetic tables): method 'rtn' ('none' for the 16-bit baseline), no method
    parameters ('{}'), embeddings and LM head left unquantized, no recovery ('none')."""
    out = raw.copy()
    baseline = ((out["dtype"] == "none") | (out["bits"] >= 16)).fillna(False).astype(bool)
    default = pd.Series(np.where(baseline, BASELINE_METHOD, DEFAULT_METHOD), index=out.index)
    out["method"] = out["method"].fillna(default) if "method" in out else default
    out["method_params"] = out["method_params"].fillna(NO_PARAMS) if "method_params" in out else NO_PARAMS
    for col in SCOPE_COLUMNS:
        out[col] = out[col].fillna(False).astype(bool) if col in out else False
    out["recover"] = out["recover"].fillna(NO_RECOVER) if "recover" in out else NO_RECOVER
    return out


def allocation_fields(row: pd.Series) -> dict[str, object] | None:
    """The parsed `allocation` JSON of a mixed job (allocator, target_bits, candidates, layers, ...);
    None for a uniform job (null, or a row without the column)."""
    text = row.get("allocation")
    if not isinstance(text, str) or not text:
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise AnalysisError(f"allocation of job {row.get('job_key')!r} is not JSON: {text[:80]!r}") from err
    return parsed if isinstance(parsed, dict) else None


def allocator_label(fields: dict[str, object]) -> str:
    """The allocator as the recipe names it: 'knapsack', or 'knapsack-measured' for another sensitivity."""
    sensitivity = fields.get("sensitivity")
    return f"{fields.get('allocator')}" + (f"-{sensitivity}" if sensitivity else "")


def is_mixed(jobs: pd.DataFrame) -> pd.Series:
    """Per row, whether its layers were given different codes (an `allocation` other than null)."""
    if "allocation" not in jobs:
        return pd.Series(False, index=jobs.index)
    return jobs["allocation"].map(lambda a: isinstance(a, str) and bool(a)).astype(bool)


def is_recovered(jobs: pd.DataFrame) -> pd.Series:
    """Per row, whether recovery adapters were trained after quantization."""
    if "recover" not in jobs:
        return pd.Series(False, index=jobs.index)
    return (jobs["recover"].fillna(NO_RECOVER) != NO_RECOVER).astype(bool)


def method_label(method: str, params: str = NO_PARAMS) -> str:
    """'rtn', or a method with its own parameters compactly: 'gptq(damp=0.01,group_size=128)'."""
    if params in ("", NO_PARAMS):
        return method
    try:
        parsed = json.loads(params)
    except json.JSONDecodeError:
        return f"{method}({params})"
    if not isinstance(parsed, dict):
        return f"{method}({params})"
    items = (
        f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}" for k, v in parsed.items()
    )
    return f"{method}({','.join(items)})"


def method_labels(jobs: pd.DataFrame) -> pd.Series:
    """Per row, its `method_label`, e.g. 'rtn', 'none' (the baseline), 'gptq(damp=0.01)'."""
    jobs = with_method(jobs)
    pairs = zip(jobs["method"], jobs["method_params"], strict=True)
    return pd.Series([method_label(m, p) for m, p in pairs], index=jobs.index, dtype=object)


def method_scope_labels(jobs: pd.DataFrame) -> pd.Series:
    """Per row, its method and scope, e.g. 'rtn', 'gptq(damp=0.01)', 'rtn +emb +head'."""
    jobs = with_method(jobs)
    labels = method_labels(jobs)
    for col, label in SCOPE_LABELS.items():
        labels = labels + np.where(jobs[col], f" {label}", "")
    return labels


def _scope(row: pd.Series) -> list[str]:
    return [label for col, label in SCOPE_LABELS.items() if bool(row[col])]


def failed_jobs(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per failed job (any row with status 'failed'): its attributes and its error."""
    raw = check_results(raw)
    failed = raw[raw["status"] != "ok"].drop_duplicates("job_key")
    failed = failed.assign(method=method_labels(failed))
    cols = ["job_key", "model", "model_family", "method", "dtype", "bits", "block_size", "outlier_fraction",
            "error"]  # fmt: skip
    return failed[cols].sort_values(["model", "bits"]).reset_index(drop=True)


SETTING_COLUMNS: tuple[str, ...] = (
    "dtype", "bits", "allocation", "method", "method_params", "exponent_bits", "block_size",
    "outlier_fraction", "centering", "recover", *SCOPE_COLUMNS,
)  # what `_setting_label` reads  # fmt: skip


def setting_labels(jobs: pd.DataFrame) -> pd.Series:
    """The quantization setting of each job without its bit width, e.g. 'nf B64 proxy 2%'.

    A label depends only on `SETTING_COLUMNS`, so it is worded once per distinct combination of them
    (a study of 35,000 jobs has a few dozen settings) and spread to the rows that share it."""
    jobs = with_method(jobs)
    if jobs.empty:
        return jobs.apply(_setting_label, axis=1).astype(str)
    columns = [c for c in SETTING_COLUMNS if c in jobs]
    codes = jobs.groupby(columns, dropna=False, sort=False).ngroup().to_numpy()
    _, first = np.unique(codes, return_index=True)  # the first row of each combination, by code
    labels = jobs.iloc[first].apply(_setting_label, axis=1).astype(str).to_numpy()
    return pd.Series(labels[codes], index=jobs.index, dtype=object).astype(str)


def _setting_label(row: pd.Series) -> str:
    if row["dtype"] == "none" or (not pd.isna(row["bits"]) and int(row["bits"]) >= 16):
        return BASELINE_SETTING
    alloc = allocation_fields(row)
    method = method_label(row["method"], _own_params(row["method_params"]) if alloc else row["method_params"])
    parts = [] if method == DEFAULT_METHOD else [method]
    if alloc:  # 'knapsack3.25[nf2-b64+nf4-b64]' as the recipe names it; its codes vary by layer
        cands = "+".join(str(c) for c in alloc.get("candidates", []))  # type: ignore[attr-defined]
        parts.append(f"mixed {allocator_label(alloc)}{float(alloc.get('target_bits', 0)):g}[{cands}]")  # type: ignore[arg-type]
    else:
        parts.append(str(row["dtype"]))
        if not pd.isna(row["exponent_bits"]):
            parts.append(f"e{int(row['exponent_bits'])}")
        parts.append("per-tensor" if pd.isna(row["block_size"]) else f"B{int(row['block_size'])}")
    if _present(row["outlier_fraction"]) and row["outlier_fraction"] > 0:
        parts.append(f"proxy {row['outlier_fraction'] * 100:g}%")
    if _present(row["centering"]) and bool(row["centering"]):
        parts.append("centered")
    recover = row.get("recover")
    if isinstance(recover, str) and recover != NO_RECOVER:
        parts.append(f"+{recover}")  # recovered points are a setting (a curve) of their own
    return " ".join([*parts, *_scope(row)])


def _own_params(params: str) -> str:
    """A mixed job's `method_params` without the allocation's own fields (they are in the label)."""
    try:
        parsed = json.loads(params)
    except (json.JSONDecodeError, TypeError):
        return params
    if not isinstance(parsed, dict):
        return params
    return json.dumps({k: v for k, v in parsed.items() if k not in ALLOCATION_PARAMS}, sort_keys=True)


def _present(value: object) -> bool:
    return not pd.isna(value)


Precision = int | str  # a bit width, or 'mixed 3.25' / '4 +lora' (see `precision_key`)
_KEY_NUMBER = re.compile(r"(\d+(?:\.\d+)?)")


def precision_key(row: pd.Series) -> Precision:
    """The precision a job's curve competes as wherever the analysis works "per bit width" (curves,
    bit-optimality, the Answer): its bit width (an int) for a uniform job and the 16-bit baseline;
    'mixed <target>' for a mixed allocation (its `bits` is only the cheapest candidate's); '<key>
    +<recover>' where recovery adapters were trained ('4 +lora', 'mixed 3.25 +lora'): their bits count,
    and the adapters make it another curve. Uniform keys stay ints, so uniform studies read as before."""
    bits = int(row["bits"]) if _present(row["bits"]) else BASELINE_BITS
    if row["dtype"] == "none" or bits >= BASELINE_BITS:
        return bits
    key: Precision = bits
    alloc = allocation_fields(row)
    if alloc is not None:
        target = alloc.get("target_bits")
        key = f"mixed {target:g}" if isinstance(target, float | int) else "mixed"
    recover = row.get("recover")
    return f"{key} +{recover}" if isinstance(recover, str) and recover != NO_RECOVER else key


def precision_keys(jobs: pd.DataFrame) -> pd.Series:
    """Per row, its `precision_key`: the integer `bits` column where no row is mixed or recovered."""
    special = is_mixed(jobs) | is_recovered(jobs)
    if not special.any():
        return jobs["bits"].fillna(BASELINE_BITS).astype(int)
    keys = [precision_key(row) if odd else int(bits) for (_, row), odd, bits in
            zip(jobs.iterrows(), special, jobs["bits"].fillna(BASELINE_BITS), strict=True)]  # fmt: skip
    return pd.Series(keys, index=jobs.index, dtype=object)


def precision_label(key: Precision) -> str:
    """A precision key in words: 4 -> '4-bit', 'mixed 3.25' -> 'mixed 3.25-bit', '4 +lora' -> '4-bit
    +lora'."""
    return _KEY_NUMBER.sub(r"\1-bit", key, count=1) if isinstance(key, str) else f"{int(key)}-bit"


def precision_order(key: Precision) -> tuple[float, int, str]:
    """A sort key for precision keys of both kinds: by bits (a mixed key by its target), uniform first."""
    if not isinstance(key, str):
        return (float(key), 0, "")
    number = _KEY_NUMBER.search(key)
    return (float(number.group(1)) if number else np.inf, 1, key)


def precision_bits(key: Precision) -> float:
    """The bit width a precision key stands for: its bits, a mixed key's target, a recovered key's base."""
    return precision_order(key)[0]


def precision_name(key: Precision) -> str:
    """A precision key as a parameter suffix: 4 -> '4', 'mixed 3.25' -> 'mixed3.25', '4 +lora' -> '4+lora'."""
    return key.replace(" ", "") if isinstance(key, str) else str(int(key))


def curve_labels(jobs: pd.DataFrame) -> pd.Series:
    """'<bits>-bit <setting>' per job, '16-bit' for the baseline, the setting alone for a mixed job
    (its setting names its target bits; its `bits` column is only the cheapest candidate's)."""
    settings = setting_labels(jobs)
    bits = jobs["bits"].astype("Int64").astype(str)
    plain = settings.where(settings == BASELINE_SETTING, bits + "-bit " + settings)
    return pd.Series(np.where(is_mixed(jobs), settings, plain), index=jobs.index)


def acc_tasks_used(raw: pd.DataFrame, tasks: Sequence[str] = PAPER_TASKS) -> list[str]:
    """The chosen zero-shot tasks that have an 'acc' value in at least one finished job."""
    ok = raw[(raw["status"] == "ok") & (raw["metric"] == "acc")]
    present = set(ok["task"].dropna())
    return [t for t in tasks if t in present]


def tidy_jobs(raw: pd.DataFrame, tasks: Sequence[str] = PAPER_TASKS) -> pd.DataFrame:
    """One row per finished job: attributes, labels and metric columns (see `analysis.metrics`).

    Failed jobs are left out here and listed by `failed_jobs`. `mean_acc` is the mean of 'acc'
    over the chosen `tasks` that the study measured; a job lacking one of them gets NaN. A task
    measured under several evaluation variants gets one column per variant (`analysis.eval_variants`),
    and so does the mean accuracy.

    Raises:
        AnalysisError: a column is missing, or no job finished.
    """
    raw = check_results(raw)
    failed = set(raw.loc[raw["status"] != "ok", "job_key"])
    ok = raw[~raw["job_key"].isin(failed)]
    if ok.empty:
        raise AnalysisError(f"all {len(failed)} jobs failed; nothing to analyse")
    tokens = [c for c in OPTIONAL_JOB_COLUMNS if c in ok and ok[c].notna().any()]  # nulls: not kept
    columns = [*JOB_COLUMNS[1:], *tokens, *(c for c in VARIANT_COLUMNS if c in ok)]
    jobs = ok.drop_duplicates("job_key").set_index("job_key")[columns].copy()
    jobs["total_model_bits"] = jobs["total_model_bits"].astype(float)
    metrics = _metric_table(_named_rows(ok))
    jobs = jobs.join(metrics, how="left")
    jobs = _add_mean_acc(jobs, acc_tasks_used(ok, tasks))
    jobs["setting"] = setting_labels(jobs)
    jobs["curve"] = curve_labels(jobs)
    return (
        jobs.reset_index().sort_values(["model_family", "n_params", "bits", "setting"]).reset_index(drop=True)
    )


def metric_rows(raw: pd.DataFrame) -> pd.DataFrame:
    """The metric rows of finished jobs, each with `column`: the tidy column its value goes to.

    Raises:
        AnalysisError: a column is missing.
    """
    raw = check_results(raw)
    failed = set(raw.loc[raw["status"] != "ok", "job_key"])
    return _named_rows(raw[~raw["job_key"].isin(failed)])


def _named_rows(ok: pd.DataFrame) -> pd.DataFrame:
    """Rows with a value, named `acc_<task>`, `ppl_<set>`, `ce_<set>`, `bpb_<set>`, `kl_<set>` in
    `column`, each suffixed `@<variant>` where its task was measured under several evaluation variants."""
    rows = ok[ok["metric"].notna() & ok["value"].notna()]
    text_sets = set(rows.loc[rows["metric"] == "nats_per_token", "task"])
    is_text = rows["task"].isin(text_sets)
    names = pd.Series(pd.NA, index=rows.index, dtype=object)
    names[(rows["metric"] == "acc") & ~is_text] = "acc_" + rows["task"]
    for metric, prefix in PPL_PREFIXES.items():
        names[(rows["metric"] == metric) & is_text] = prefix + rows["task"]
    keep = names.notna()
    rows, names, is_text = rows[keep], names[keep], is_text[keep]
    if rows.empty:
        return rows.assign(column=pd.Series(dtype=object))
    suffixes = variant_suffixes(rows, is_text)
    return rows.assign(column=[variant_column(n, v) for n, v in zip(names, suffixes, strict=True)])


def _metric_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Pivot named metric rows (`_named_rows`) to one column per name (+ `_se`)."""
    if rows.empty:
        return pd.DataFrame(index=pd.Index([], name="job_key"))
    values = rows.pivot_table(index="job_key", columns="column", values="value", aggfunc="first")
    stderr = rows.pivot_table(index="job_key", columns="column", values="stderr", aggfunc="first")
    stderr = stderr.reindex(columns=values.columns).rename(columns=se_column)
    return values.join(stderr).rename_axis(columns=None)


def mean_acc_parts(columns: Sequence[str], tasks: Sequence[str]) -> dict[str, list[str]]:
    """Each mean accuracy column (`mean_acc`, `mean_acc@<variant>`) and the `acc_<task>` columns it
    averages, given the metric columns present: one mean per evaluation variant where tasks have several."""
    if not tasks:
        return {}
    values = [c for c in columns if is_metric_column(c)]
    per_task = {t: [c for c in values if split_variant(c)[0] == f"acc_{t}"] for t in tasks}
    split = {t for t, cols in per_task.items() if any(split_variant(c)[1] for c in cols)}
    found = sorted({split_variant(c)[1] for t in split for c in per_task[t]})
    parts = {}
    for variant in found or [""]:
        cols = [variant_column(f"acc_{t}", variant if t in split else "") for t in tasks]
        missing = [c for c in cols if c not in values]
        if missing:
            log.warning("no %s: no job has %s", variant_column(MEAN_ACC, variant), missing)
            continue
        parts[variant_column(MEAN_ACC, variant)] = cols
    return parts


def _add_mean_acc(jobs: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """`mean_acc` over `tasks`; one `mean_acc@<variant>` per evaluation variant where tasks have several."""
    for name, cols in mean_acc_parts(list(jobs.columns), tasks).items():
        _add_mean(jobs, cols, name, tasks)
    return jobs


def _add_mean(jobs: pd.DataFrame, cols: list[str], name: str, tasks: list[str]) -> None:
    jobs[name] = jobs[cols].mean(axis=1, skipna=False)
    se_cols = [se_column(c) for c in cols]
    jobs[se_column(name)] = np.sqrt((jobs[se_cols] ** 2).sum(axis=1, min_count=len(cols))) / len(cols)
    incomplete = int(jobs[name].isna().sum())
    if incomplete and name == MEAN_ACC:
        log.warning("%d jobs lack one of the tasks %s: no mean accuracy for them", incomplete, tasks)


def study_grid(raw: pd.DataFrame) -> pd.DataFrame:
    """The study's grid: each axis, its distinct values, and job counts (finished / failed)."""
    raw = check_results(raw)
    jobs = raw.drop_duplicates("job_key")
    jobs = jobs.assign(method=method_labels(jobs))
    status = raw.groupby("job_key")["status"].agg(lambda s: "failed" if (s != "ok").any() else "ok")
    axes = ["model_family", "model", "n_params", "bits", "method", "dtype", "block_size", "exponent_bits",
            "outlier_fraction", "centering", *SCOPE_COLUMNS]  # fmt: skip
    axes += [c for c in OPTIONAL_JOB_COLUMNS if c in jobs and jobs[c].notna().any()]
    axes += ["recover"] if "recover" in jobs else []
    # method and scope are shown where a study departs from the paper's default (rtn, linear layers
    # only), so a grid of the paper's kind reads as it always did
    axes = [a for a in axes if a not in _DEFAULT_ONLY or not _at_default(jobs[a], _DEFAULT_ONLY[a])]
    rows = [
        {
            "axis": a,
            "values": ", ".join(
                _fmt(v)
                for v in sorted(jobs[a].dropna().unique().tolist()) + ([None] if jobs[a].isna().any() else [])
            ),
        }
        for a in axes
    ]
    rows.append({"axis": "tasks", "values": ", ".join(sorted(raw["task"].dropna().unique()))})
    rows.append({"axis": "jobs finished", "values": str(int((status == "ok").sum()))})
    rows.append({"axis": "jobs failed", "values": str(int((status != "ok").sum()))})
    return pd.DataFrame(rows)


_DEFAULT_ONLY: dict[str, set[object]] = {
    "method": {"rtn", "none"},
    "quantize_embeddings": {False},
    "quantize_lm_head": {False},
    "recover": {NO_RECOVER},
}


def _at_default(values: pd.Series, defaults: set[object]) -> bool:
    return set(values.dropna().tolist()) <= defaults


def _fmt(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
