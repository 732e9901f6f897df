"""RTN's working memory on the GPU against the memory plan's `method` term (issue 20).

    python benchmarks/quantize_peak.py --device cuda --out benchmarks/results/quantize-peak-h200.json

One block of the 30B Llama shape (its largest matrix: 6656 x 17920, bf16) is built on the device as
`benchmarks/bigmodel.py` builds models; for each recipe the peak of `torch.cuda.max_memory_allocated` above
what the model holds is measured while `quantize_model_` runs (after a restore from the snapshot), and set
against `pipeline.memplan.method_bytes` for the same shape. The bigmodel run showed the plan under-counting
the peak by ~1.5 GiB; this finds which recipe's temporaries it misses. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bigmodel import build_on_device  # noqa: E402

RECIPES = ("int4-b64", "nf4-b64", "fp4-b64", "int8-b64", "nf4-b4096", "int3-b1024", "nf4-bnone")


def recipe_of(name: str) -> Any:
    from pipeline.recipe import Recipe

    code, block = name.split("-b")
    dtype, bits = code.rstrip("0123456789"), int(code[len(code.rstrip("0123456789")) :])
    return Recipe(dtype=dtype, bits=bits, block_size=None if block == "none" else int(block))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda"])
    parser.add_argument("--shape", default="llama-30b-block")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import torch

    from pipeline.memplan import JobLoad, method_bytes, shape_of
    from pipeline.models import quantize_model_
    from pipeline.snapshot import restore_, take_snapshot

    model = build_on_device(args.shape, args.device, torch.bfloat16)
    shape = shape_of(model)
    snapshot = take_snapshot(model, "cpu")
    planned = method_bytes(shape, JobLoad(1, 1))
    rows = []
    for name in RECIPES:
        try:
            recipe = recipe_of(name)
        except ValueError as err:  # a recipe this version refuses: say so, measure the rest
            rows.append({"recipe": name, "error": str(err)})
            continue
        restore_(model, snapshot)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        quantize_model_(model, recipe)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        rows.append({"recipe": name, "peak_extra_gib": extra / 2**30,
                     "bytes_per_max_matrix_value": extra / shape.max_matrix_params})  # fmt: skip
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
              "max_matrix_params": shape.max_matrix_params, "planned_method_gib": planned / 2**30,
              "rows": rows}  # fmt: skip
    print(f"{result['device']}, {args.shape}: largest matrix {shape.max_matrix_params / 1e6:.0f}M values; "
          f"plan's method term {planned / 2**30:.2f} GiB")  # fmt: skip
    print("| recipe | peak above the model, GiB | bytes per value of the largest matrix |\n|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['recipe']} | refused: {r['error']} | - |")
            continue
        print(f"| {r['recipe']} | {r['peak_extra_gib']:.2f} | {r['bytes_per_max_matrix_value']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
