"""Quantizing a whole model in place: `quantize_model_` per data type, against the copy floor.

    python benchmarks/quantize_model.py --device cuda --out benchmarks/results/quantize-model-h200.json

A GPT-NeoX of Pythia-410M's shape (random weights, bf16 on CUDA) is quantized per configuration as a
job does it (restore from the resident snapshot, then `quantize_model_`), synced at the ends; median
of --reps. The floor is the same bytes moved by a plain copy: every quantized matrix read once and
written once (`torch._foreach_copy_` of the matrices onto themselves' snapshot). For the quantile
type the per-matrix codebook path (`pipeline.methods.rtn.batched_codebooks` off) runs too.
Prints a table and writes JSON (device, torch version, every timing) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = [
    ("int", 4, 64),
    ("fp", 4, 64),
    ("nf", 4, 64),
    ("quantile", 4, 64),
    ("dynamic", 4, 64),
    ("nf", 4, None),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="pythia-410m", choices=["tiny", "pythia-410m"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from benchmarks.evaluation import SHAPES
    from benchmarks.forward_profile import timed
    from kernels import QuantSpec
    from pipeline import models
    from pipeline.methods import rtn
    from pipeline.recipe import Recipe

    cuda = args.device.startswith("cuda")
    dims = dict(SHAPES[args.shape])
    dims.setdefault("vocab_size", 1024)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(tie_word_embeddings=False, **dims))
    model = model.to(args.device, torch.bfloat16 if cuda else torch.float32).eval()
    snapshot = models.snapshot_weights(model)
    weights = list(models.linear_weights(model).values())
    copies = [w.clone() for w in weights]
    n_bytes = sum(w.numel() * w.element_size() for w in weights)
    floor = timed(lambda: torch._foreach_copy_(weights, copies), args.reps)
    restore = timed(lambda: models.restore_weights_(model, snapshot), args.reps)
    rows = []
    batched = rtn.batched_codebooks
    for dtype, bits, block in CONFIGS:
        spec = QuantSpec(dtype, bits, block)
        ways = (
            [("batched", batched), ("per matrix", lambda *a: {})] if dtype == "quantile" else [("", batched)]
        )
        for way, codebooks in ways:
            rtn.batched_codebooks = codebooks

            def job(spec: QuantSpec = spec) -> None:
                models.restore_weights_(model, snapshot)
                models.quantize_model_(model, Recipe.of(spec))

            seconds = timed(job, args.reps) - restore
            rows.append(
                {"config": spec.name, "codebooks": way, "quantize_s": seconds, "x_floor": seconds / floor}
            )
    models.batched_codebooks = batched
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"{device}; {len(weights)} matrices, {n_bytes / 1e9:.2f} GB; copy floor {floor * 1e3:.2f} ms "
        f"({2 * n_bytes / floor / 1e9:.0f} GB/s read+write); restore {restore * 1e3:.2f} ms"
    )
    print("| config | codebooks | quantize ms | x copy floor |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['codebooks'] or '-'} | {r['quantize_s'] * 1e3:.2f} | {r['x_floor']:.1f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "device": device,
            "torch": torch.__version__,
            "shape": args.shape,
            "matrices": len(weights),
            "bytes": n_bytes,
            "copy_floor_s": floor,
            "restore_s": restore,
            "rows": rows,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
