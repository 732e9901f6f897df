"""Report content as plain blocks, rendered to self-contained HTML and to Markdown.

Sections hold text, tables, figures (already saved as PNG+SVG; the HTML embeds the PNG as a data
URI, the Markdown links to it) and gaps: parts of the report that could not be produced, and why.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

import pandas as pd
from matplotlib.figure import Figure

MAX_TABLE_ROWS = 200


@dataclass(frozen=True)
class Block:
    """One piece of a section: exactly one of text, table, figure or gap."""

    text: str = ""
    table: pd.DataFrame | None = None
    figure: Figure | None = None
    name: str = ""  # file stem of the figure, or a caption for a table
    gap: str = ""
    saved: bool = False  # a figure already written as figures/<name>.png and .svg, its `Figure` let go

    @property
    def has_figure(self) -> bool:
        """Whether this block is a figure (drawn, or already saved)."""
        return self.figure is not None or self.saved


@dataclass(frozen=True)
class Section:
    """A titled part of the report."""

    title: str
    blocks: tuple[Block, ...] = field(default_factory=tuple)

    @property
    def gaps(self) -> list[str]:
        return [b.gap for b in self.blocks if b.gap]


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """Numbers to 4 significant digits, bits in scientific notation, missing values as '–'."""
    shown = table.head(MAX_TABLE_ROWS).copy()
    for col in shown.columns:
        values = shown[col]
        non_null = values.dropna()
        if pd.api.types.is_bool_dtype(values) or (len(non_null) and non_null.map(type).eq(bool).all()):
            shown[col] = values.map(lambda v: "–" if pd.isna(v) else "yes" if v else "no")
        elif pd.api.types.is_float_dtype(values):
            spec = ".3g" if "bits" in str(col) and values.abs().max() > 1e4 else ".4g"
            shown[col] = values.map(lambda v, s=spec: "–" if pd.isna(v) else format(v, s))
    return shown.astype(object).where(shown.notna(), "–")


def _table_note(table: pd.DataFrame) -> str:
    return f"(first {MAX_TABLE_ROWS} of {len(table)} rows)" if len(table) > MAX_TABLE_ROWS else ""


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.82em;margin:.8em 0}th,td{border:1px solid #ddd;padding:.25em .5em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto;margin:.5em 0}.gap{background:#fff4e5;border-left:4px solid #f0a020;
padding:.4em .8em}.answer{background:#eef6ff;border-left:4px solid #1f77b4;padding:.6em 1em;font-size:1.05em}
figcaption{font-size:.85em;color:#555}
"""


def render_html(title: str, sections: list[Section], figure_png: dict[str, bytes]) -> str:
    """A single HTML page with every figure embedded (no external files or links)."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f'<h2 id="{_anchor(section.title)}">{html.escape(section.title)}</h2>')
        body.extend(
            _html_block(block, figure_png, answer=section.title == "Answer") for block in section.blocks
        )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _anchor(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower())


def _html_block(block: Block, figure_png: dict[str, bytes], answer: bool) -> str:
    if block.gap:
        return f'<p class="gap">Not produced: {html.escape(block.gap)}</p>'
    if block.table is not None:
        caption = f"<p><b>{html.escape(block.name)}</b> {_table_note(block.table)}</p>" if block.name else ""
        return caption + format_table(block.table).to_html(index=False, escape=True, border=0)
    if block.has_figure:
        data = base64.b64encode(figure_png[block.name]).decode("ascii")
        return (
            f'<figure><img alt="{html.escape(block.name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(block.name)} (PNG and SVG in figures/)</figcaption></figure>"
        )
    css = ' class="answer"' if answer else ""
    return f"<p{css}>{html.escape(block.text)}</p>"


def render_markdown(title: str, sections: list[Section]) -> str:
    """The same report as Markdown: tables inline, figures linked from figures/."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            lines += [*_markdown_block(block), ""]
    return "\n".join(lines)


def _markdown_block(block: Block) -> list[str]:
    if block.gap:
        return [f"> **Not produced:** {block.gap}"]
    if block.table is not None:
        head = [f"**{block.name}** {_table_note(block.table)}".strip(), ""] if block.name else []
        return head + markdown_table(format_table(block.table))
    if block.has_figure:
        return [f"![{block.name}](figures/{block.name}.png)"]
    return [block.text]


def markdown_table(table: pd.DataFrame) -> list[str]:
    """A pipe table (cells' pipes escaped)."""

    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return [header, rule, *rows] if len(table.columns) else []


def figure_names(sections: list[Section]) -> list[str]:
    """Every figure's name, in report order (names must be unique)."""
    names = [b.name for s in sections for b in s.blocks if b.has_figure]
    assert len(names) == len(set(names)), f"duplicate figure names {names}"
    return names
