"""The paired counts quoted in docs/study-h100-ladder.md ("The held-out study with paired tests").

    python docs/scripts/paired_findings.py [results/h100-ladder-heldout-paired]

Every comparison resamples the same 100 text chunks for both sides (analysis.paired, 400 replicates);
"decisive" means the 95% CI of the difference excludes 0. Settings without proxy quantization only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from analysis.paired import UnitScores, paired_difference

N_BOOT = 400


def scores(row: pd.Series) -> UnitScores:
    return UnitScores(np.asarray(row["unit_sums"], float), np.asarray(row["unit_counts"], float))


def against_16bit(ce: pd.DataFrame, kl: pd.DataFrame) -> None:
    base = ce[ce["bits"] == 16].set_index("model")
    print("bits | decisively worse than 16-bit | decisively better | mean degradation | mean KL | max KL")
    for bits in (3, 4, 5, 6, 7, 8):
        rows = ce[ce["bits"] == bits]
        diffs = [
            paired_difference(scores(r), scores(base.loc[r["model"]]), N_BOOT) for _, r in rows.iterrows()
        ]
        worse = sum(d.ci_low > 0 for d in diffs)
        better = sum(d.ci_high < 0 for d in diffs)
        degradation = float(np.mean(rows["value"].to_numpy() - base.loc[rows["model"], "value"].to_numpy()))
        k = kl[kl["bits"] == bits]["value"]
        print(f"{bits} | {worse}/{len(rows)} | {better} | {degradation:.4f} | {k.mean():.4f} | {k.max():.4f}")


def matched(ce: pd.DataFrame, bits: int, a: Callable[[pd.Series], bool], b: Callable[[pd.Series], bool],
            by: list[str]) -> tuple[int, int, int]:  # fmt: skip
    """(A decisively better, B decisively better, pairs) over groups holding one A and one B row."""
    a_wins = b_wins = n = 0
    for _, group in ce[ce["bits"] == bits].groupby(by, dropna=False):
        ga, gb = group[group.apply(a, axis=1)], group[group.apply(b, axis=1)]
        if len(ga) == 1 and len(gb) == 1:
            d = paired_difference(scores(ga.iloc[0]), scores(gb.iloc[0]), N_BOOT)
            n, a_wins, b_wins = n + 1, a_wins + (d.ci_high < 0), b_wins + (d.ci_low > 0)
    return a_wins, b_wins, n


def main(folder: str = "results/h100-ladder-heldout-paired") -> None:
    rows = pq.read_table(f"{folder}/rows.parquet").to_pandas()
    rows["bs"] = rows["block_size"].fillna(0).astype(int)  # 0: per tensor
    plain = rows[rows["outlier_fraction"] == 0]
    ce, kl = plain[plain["metric"] == "nats_per_token"], plain[plain["metric"] == "kl_to_16bit"]
    against_16bit(ce, kl)
    dtype = lambda name: lambda r: r["dtype"] == name  # noqa: E731
    for bits in (3, 4):
        print(
            f"{bits}-bit B64 vs B1024 (same model, dtype):",
            matched(ce, bits, lambda r: r["bs"] == 64, lambda r: r["bs"] == 1024, ["model", "dtype"]),
        )
        for x, y in [("nf", "fp"), ("fp", "int"), ("quantile", "fp"), ("quantile", "int"), ("nf", "int"),
                     ("dynamic", "int")]:  # fmt: skip
            print(
                f"{bits}-bit {x} vs {y} (same model, block):",
                matched(ce, bits, dtype(x), dtype(y), ["model", "bs"]),
            )
    both = ce[ce["bits"] < 16].merge(kl[["job_key", "value"]], on="job_key", suffixes=("", "_kl"))
    base = ce[ce["bits"] == 16].set_index("model")["value"]
    both["degradation"] = both["value"] - base.loc[both["model"]].to_numpy()
    print(
        "KL vs degradation: Pearson",
        round(float(np.corrcoef(both["value_kl"], both["degradation"])[0, 1]), 4),
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
