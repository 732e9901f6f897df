"""The equal-bits sections (binary codes, mixed vs uniform, recovery) on a synthetic study, the bit map,
and the labels that keep mixed and recovered points apart from uniform ones."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from analysis.errors import AnalysisError
from analysis.plots_methods import bit_map, candidate_bits
from analysis.render import Section
from analysis.report import build_report, build_sections, study_from_results
from analysis.sections_frontier import BINARY_TITLE, MIXED_TITLE, RECOVERY_TITLE
from analysis.tidy import tidy_jobs
from pipeline.results import load_results
from tests.analysis.conftest import SIZES
from tests.analysis.synthetic import Config, Units, study_frame, write_study

TITLES = (BINARY_TITLE, MIXED_TITLE, RECOVERY_TITLE)
CANDIDATES = ["nf3-b64", "nf4-b64", "int8-b64"]
LAYERS = {"layers.0.attn": "nf4-b64", "layers.0.mlp": "nf3-b64", "layers.1.attn": "int8-b64",
          "layers.1.mlp": "nf3-b64"}  # fmt: skip


def allocation(target: float) -> str:
    fields = {"allocator": "knapsack", "target_bits": target, "candidates": CANDIDATES, "layers": LAYERS,
              "budget_bits": 0, "gap_bits": 0, "unit_bits": 1}  # fmt: skip
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def uniform(n: int) -> list[Config]:
    return [Config(n, 3, "nf"), Config(n, 4, "nf"), Config(n, 8, "int"), Config(n, 16)]


def variants(n: int) -> list[Config]:
    return [
        Config(n, 3, "bcq", method="bcq"),  # the nf3 job's bits exactly: on the frontier's nf3 point
        Config(n, 3, "nf", allocation=allocation(3.75), extra_bits=0.5),  # between nf3 and nf4
        Config(n, 3, "nf", recover="lora", adapter_bits=n // 4),  # + 1/4 bit a parameter
    ]


def offset(cfg: Config) -> float:
    """Mixed and recovered points clearly better than uniform at their bits; bcq clearly worse."""
    return {"bcq": -0.05}.get(cfg.method, 0.05 if cfg.allocation or cfg.recover != "none" else 0.0)


def configs(with_variants: bool = True) -> list[Config]:
    return [c for n in SIZES for c in uniform(n) + (variants(n) if with_variants else [])]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return study_frame(configs(), noise=0.0, seed=2, offset=offset, units=Units(n_units=60, job_sd=0.002))


def test_labels_keep_mixed_and_recovered_points_apart(frame: pd.DataFrame) -> None:
    tidy = tidy_jobs(frame)
    mixed = tidy[tidy["allocation"].notna()]
    assert set(mixed["curve"]) == {"mixed knapsack3.75[nf3-b64+nf4-b64+int8-b64]"}  # no '3-bit': a target
    assert set(tidy.loc[tidy["recover"] == "lora", "curve"]) == {"3-bit nf B64 +lora"}
    plain = (
        (tidy["recover"] == "none")
        & tidy["allocation"].isna()
        & (tidy["dtype"] == "nf")
        & (tidy["bits"] == 3)
    )
    assert set(tidy.loc[plain, "curve"]) == {"3-bit nf B64"}


@pytest.fixture(scope="module")
def sections(frame: pd.DataFrame) -> dict[str, Section]:
    return {s.title: s for s in build_sections(study_from_results(frame, "variants", n_boot=100))}


def test_sections_appear_only_with_such_rows(sections: dict[str, Section]) -> None:
    plain = study_frame(configs(with_variants=False), noise=0.0, seed=2)
    titles = [s.title for s in build_sections(study_from_results(plain, "plain", n_boot=0))]
    assert not set(TITLES) & set(titles)
    for title in TITLES:
        assert title in sections and not sections[title].gaps, (title, sections.get(title))


def _summary(sections: dict[str, Section], title: str) -> pd.DataFrame:
    tables = [b.table for b in sections[title].blocks if b.table is not None and "mean over models" in b.name]
    return tables[0]


def test_mixed_and_recovered_beat_the_frontier_decisively_and_bcq_loses(sections: dict[str, Section]) -> None:
    mixed = _summary(sections, MIXED_TITLE)
    assert mixed.loc[0, "gain"] > 0 and mixed.loc[0, "decisive"] == "4 wins, 0 losses of 4"
    assert mixed.loc[0, "target_bits"] == 3.75 and mixed.loc[0, "allocator"] == "knapsack"
    recovered = _summary(sections, RECOVERY_TITLE)
    assert recovered.loc[0, "gain"] > 0 and recovered.loc[0, "decisive"] == "4 wins, 0 losses of 4"
    binary = _summary(sections, BINARY_TITLE)
    assert binary.loc[0, "gain"] == pytest.approx(-0.05, abs=1e-6)  # at the nf3 point: minus its offset
    assert binary.loc[0, "decisive"] == "0 wins, 4 losses of 4"


def test_bit_map_parses_the_allocation(frame: pd.DataFrame) -> None:
    tidy = tidy_jobs(frame)
    table = bit_map(tidy, f"toy-{SIZES[0]}")
    assert table["layer"].tolist() == list(LAYERS)
    assert table["bits"].tolist() == [4, 3, 8, 3]
    assert set(table["row"]) == {"rtn knapsack 3.75"}
    with pytest.raises(AnalysisError, match="no mixed-precision job"):
        bit_map(tidy[tidy["allocation"].isna()], f"toy-{SIZES[0]}")


@pytest.mark.parametrize(
    ("label", "bits"), [("nf3-b64", 3), ("fp4-e2-b64", 4), ("int8-tensor", 8), ("16-bit", 16)]
)
def test_candidate_bits(label: str, bits: int) -> None:
    assert candidate_bits(label) == bits


def test_candidate_bits_names_a_bad_label() -> None:
    with pytest.raises(AnalysisError, match="'nf-b64'"):
        candidate_bits("nf-b64")


def test_end_to_end_report(tmp_path: Path) -> None:
    study = tmp_path / "variants"
    write_study(study, configs(), noise=0.0, seed=2, offset=offset, units=Units(n_units=40))
    files = build_report(study, n_boot=50)
    summary = files.markdown.read_text()
    for title in TITLES:
        assert f"## {title}" in summary
    assert any(p.name == f"bit-map-toy-{SIZES[-1]}.png" for p in files.figures)
    assert not [g for g in files.gaps if g.split(":")[0] in TITLES]
    assert len(load_results(study)["job_key"].unique()) == len(configs())
