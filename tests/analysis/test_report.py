"""The report renders from small real results folders, and bad input gets clear messages."""

from __future__ import annotations

import base64
import io
import xml.etree.ElementTree as ET
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from analysis.report import main
from tests.analysis.synthetic import Config, grid, write_failed, write_study

SECTIONS = [
    "Answer",
    "Gaps",
    "Study",
    "Scaling curves",
    "Parametric fits",
    "Bit-optimal precision per memory budget",
    "Pareto front",
    "Data type and block size",
    "Proxy quantization at 3 and 4 bits",
    "Failed jobs",
]


class ReportParser(HTMLParser):
    """Collects section titles, image sources, paragraph classes and external references."""

    def __init__(self) -> None:
        super().__init__()
        self.h2: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.answer: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "h2" or (tag == "p" and attr.get("class") == "answer"):
            self._in = "h2" if tag == "h2" else "answer"
        if tag == "img":
            self.images.append(attr["src"] or "")
        for key in ("src", "href"):
            if (attr.get(key) or "").startswith(("http:", "https:", "//")):
                self.external.append(attr[key] or "")

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "h2":
            self.h2.append(data)
        elif self._in == "answer":
            self.answer.append(data)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small study (3 sizes, 3/4 bits, fp/int, proxy on/off, one failed job) and its report."""
    root = tmp_path_factory.mktemp("report")
    study = root / "results" / "small"
    configs = grid(sizes=(1_000_000, 4_000_000, 16_000_000), bits=(3, 4), dtypes=("fp", "int"),
                   outlier_fractions=(0.0, 0.02))  # fmt: skip
    write_study(study, configs, noise=0.002, offset=lambda c: -0.03 * (c.dtype == "int"))
    write_failed(study, Config(16_000_000, 3, "nf"), error="CUDA out of memory (synthetic)")
    assert main([str(study), "--out", str(root / "out"), "--n-boot", "20", "--budgets", "6"]) == 0
    return root / "out"


def test_html_is_self_contained_with_every_section(report_dir: Path) -> None:
    text = (report_dir / "report.html").read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(text)
    parser.close()
    assert parser.h2 == SECTIONS
    assert parser.external == []
    assert len(parser.images) >= 8
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    answer = " ".join(parser.answer)
    assert "no paired CI is available" in answer and "small" not in answer.split(":")[0]
    assert "CUDA out of memory (synthetic)" in text
    assert "None: every part of the report was produced." in text


def test_figures_are_png_and_svg_that_open(report_dir: Path) -> None:
    pngs = sorted((report_dir / "figures").glob("*.png"))
    svgs = sorted((report_dir / "figures").glob("*.svg"))
    assert [p.stem for p in pngs] == [s.stem for s in svgs]
    expected = {"pareto", "proxy", "fit-shared-slope", "fit-effective-params", "optimality-toy"}
    assert expected <= {p.stem for p in pngs}
    for png in pngs:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 300
    for svg in svgs:
        assert ET.parse(svg).getroot().tag.endswith("svg")


def test_markdown_summary_has_answer_tables_and_links(report_dir: Path) -> None:
    text = (report_dir / "summary.md").read_text(encoding="utf-8")
    for title in SECTIONS:
        assert f"## {title}" in text
    assert "bit-optimal" in text.split("## Gaps")[0]
    for link in [line for line in text.splitlines() if line.startswith("![")]:
        assert (report_dir / link.split("(", 1)[1].rstrip(")")).exists()
    assert "| model_family | budget_bits |" in text


def test_one_model_size_writes_what_it_can_and_states_the_gap(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    study = tmp_path / "one"
    write_study(study, grid(sizes=(1_000_000,), bits=(4,)))
    assert main([str(study), "--n-boot", "5"]) == 0
    html = (study / "report" / "report.html").read_text(encoding="utf-8")
    assert "scaling curves need &gt;= 2 model sizes per family; got &#x27;toy&#x27;: 1" in html
    assert "no bit-optimality answer" in html
    assert (study / "report" / "figures" / "pareto.png").exists()
    assert "gap: Scaling curves" in capsys.readouterr().out


def test_all_jobs_failed_still_lists_the_failures(tmp_path: Path) -> None:
    study = tmp_path / "failed"
    write_failed(study, Config(1_000_000, 3), error="segfault in kernel")
    assert main([str(study), "--out", str(tmp_path / "out")]) == 0
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "segfault in kernel" in html and "no finished job" in html


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "no result files"),
        (lambda p: (p.mkdir(), pq.write_table(pa.table({"a": [1]}), p / "x.parquet")), "missing columns"),
        (lambda p: (p.mkdir(), (p / "x.parquet").write_text("not parquet")), "not a readable Parquet file"),
    ],
)
def test_bad_input_gets_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture, make: Callable[[Path], object], message: str
) -> None:
    study = tmp_path / "study"
    make(study)
    assert main([str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kbitscale-report: error:") and message in err


def test_unknown_metric_lists_the_allowed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_study(tmp_path / "s", [Config(1_000_000, 4)])
    assert main([str(tmp_path / "s"), "--metric", "acc_mmlu"]) == 2
    assert "allowed: [" in capsys.readouterr().err


def test_grid_counts_in_study_section(report_dir: Path) -> None:
    tables = pd.read_html(io.StringIO((report_dir / "report.html").read_text(encoding="utf-8")))
    grid_table = next(t for t in tables if list(t.columns) == ["axis", "values"]).set_index("axis")["values"]
    assert grid_table["jobs failed"] == "1"
    assert grid_table["jobs finished"] == str(3 * 2 * 2 * 2 + 3)
