"""A model as large as the GPU: pristine copy on the host, restore and quantize per job, MFU, memory plan.

    python benchmarks/bigmodel.py --device cuda --shape llama-30b --out benchmarks/results/bigmodel-h200.json
    python benchmarks/bigmodel.py --device cpu --shape tiny          # the same code path, in seconds

A random-weight Llama of the shape is built straight on the device (meta init, `to_empty`, an
in-place fill there: no host round trip), its pristine copy is taken in pinned host memory
(`model.snapshot=cpu`), and --jobs jobs run as a worker runs them: restore from the host
(asynchronous copies, one sync), quantize with RTN nf4-b64. Then a forward over --batch x --seq
tokens (MFU against --peak-tflops), and the memory plan's per-GPU prediction against
`torch.cuda.max_memory_allocated` (the plan adds `RUNTIME_BYTES` of context and allocator slack the
allocator does not count). A smaller --ckpt-shape model is saved as sharded safetensors and loaded
back with `from_pretrained(device_map=device)` (shards read straight onto the device), in GB/s;
the files were just written, so the read is from the page cache unless the OS dropped them. The
sharded path (accelerate's device map over two slots of this one device) runs on that model too.
Prints a table and writes JSON (device, torch version, every timing) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (d_model, n_layers, d_ff, n_heads, vocab)
SHAPES = {
    "tiny": (64, 2, 128, 4, 512),
    "llama-1b": (2048, 16, 5632, 16, 32000),
    "llama-7b": (4096, 32, 11008, 32, 32000),
    "llama-13b": (5120, 40, 13824, 40, 32000),
    "llama-30b": (6656, 60, 17920, 52, 32000),
    "llama-30b-block": (6656, 1, 17920, 52, 32000),  # one block of the 30B shape
}


def llama_config(shape: str) -> Any:
    from transformers import LlamaConfig

    d, layers, d_ff, heads, vocab = SHAPES[shape]
    return LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=d_ff, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )  # fmt: skip


def build_on_device(shape: str, device: str, torch_dtype: Any) -> Any:
    """A random-weight Llama made on `device` directly: meta modules, `to_empty`, filled in place."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=torch_dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    # non-persistent buffers (rotary inverse frequencies) are left empty by to_empty: make them again
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval().requires_grad_(False)


def timed(fn: Any, device: str) -> tuple[Any, float]:
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def forward_flops(shape: str, n_matmul_params: int, batch: int, seq: int) -> float:
    """2 FLOPs per matmul weight per token, plus causal attention's QK^T and AV (2·L·seq·d per token)."""
    d, layers, *_ = SHAPES[shape]
    tokens = batch * seq
    return 2.0 * n_matmul_params * tokens + 2.0 * layers * seq * d * tokens


def big_model_leg(args: argparse.Namespace, torch_dtype: Any) -> dict[str, Any]:
    import torch

    from pipeline.memplan import JobLoad, plan_memory, shape_of
    from pipeline.models import quantize_model_
    from pipeline.recipe import Recipe
    from pipeline.snapshot import restore_, take_snapshot

    cuda = args.device == "cuda"
    model, build_s = timed(partial(build_on_device, args.shape, args.device, torch_dtype), args.device)
    shape = shape_of(model)
    snapshot, snapshot_s = timed(partial(take_snapshot, model, "cpu"), args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    recipe = Recipe(dtype="nf", bits=4, block_size=64)
    restore_s, quantize_s = [], []
    for _ in range(args.jobs):
        restore_s.append(timed(partial(restore_, model, snapshot), args.device)[1])
        quantize_s.append(timed(partial(quantize_model_, model, recipe), args.device)[1])
    restore_(model, snapshot)
    tokens = torch.randint(0, SHAPES[args.shape][4], (args.batch, args.seq), device=args.device)
    with torch.inference_mode():
        model(tokens, use_cache=False)  # warm-up; scoring keeps no KV cache (3 GiB at this batch)
        forward_s = min(timed(partial(model, tokens, use_cache=False), args.device)[1] for _ in range(3))
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    flops = forward_flops(args.shape, matmul, args.batch, args.seq)
    capacity = (torch.cuda.get_device_properties(args.device).total_memory,) if cuda else ()
    plan = plan_memory(shape, JobLoad(args.batch, args.seq), snapshot="cpu", gpu_capacity=capacity)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    result = {
        "shape": args.shape, "n_params": shape.n_params, "weights_gib": shape.param_bytes / 2**30,
        "build_s": build_s, "snapshot_to_host_s": snapshot_s,
        "snapshot_to_host_gb_s": shape.param_bytes / snapshot_s / 1e9,
        "restore_s": restore_s, "restore_gb_s": [shape.param_bytes / s / 1e9 for s in restore_s],
        "quantize_s": quantize_s, "job_s": [r + q for r, q in zip(restore_s, quantize_s, strict=True)],
        "forward_tokens": args.batch * args.seq, "forward_s": forward_s,
        "forward_tflops": flops / forward_s / 1e12,
        "mfu": flops / forward_s / (args.peak_tflops * 1e12) if cuda else None,
        "plan_gpu_gib": plan.gpu_need / 2**30, "plan_table": plan.table(args.shape),
        "max_memory_allocated_gib": None if peak is None else peak / 2**30,
    }  # fmt: skip
    return result  # the model and its pinned copy are freed on return


def checkpoint_leg(args: argparse.Namespace, torch_dtype: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.models.shard import plan_device_map, shard_model_
    from pipeline.snapshot import restore_, take_snapshot

    model = build_on_device(args.ckpt_shape, args.device, torch_dtype)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        _, save_s = timed(partial(model.save_pretrained, folder, max_shard_size="2GB"), args.device)
        model.to("meta")  # free its memory before the load
        n_shards = len(list(Path(folder).glob("*.safetensors")))
        load = partial(
            AutoModelForCausalLM.from_pretrained, folder, dtype=torch_dtype, device_map=args.device
        )
        loaded, load_s = timed(load, args.device)
    # the sharded path: whole blocks over two slots of this device, hooks between them
    device_map = plan_device_map(loaded, [n_bytes // 2, 2 * n_bytes])
    shard_model_(loaded, device_map, [torch.device(args.device), torch.device(args.device)])
    snapshot = take_snapshot(loaded, "cpu")
    with torch.no_grad():
        for p in loaded.parameters():
            p.mul_(0.5)
    restore_(loaded, snapshot)
    restored = all(torch.equal(p.cpu(), snapshot.tensors[n]) for n, p in loaded.named_parameters())
    return {
        "ckpt_shape": args.ckpt_shape, "ckpt_gib": n_bytes / 2**30, "shards": n_shards,
        "save_s": save_s, "save_gb_s": n_bytes / save_s / 1e9,
        "load_s": load_s, "load_gb_s": n_bytes / load_s / 1e9,
        "sharded_devices": sorted(set(device_map.values())), "sharded_restore_bit_identical": restored,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shape", default="llama-30b", choices=sorted(SHAPES))
    parser.add_argument("--ckpt-shape", default=None, choices=sorted(SHAPES), help="default: llama-7b / tiny")
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="default: 4 on cuda, 1 on cpu")
    parser.add_argument("--seq", type=int, default=None, help="default: 512 on cuda, 32 on cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM)")
    parser.add_argument("--tmp", default=None, help="folder for the checkpoint (default: the system's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.ckpt_shape = args.ckpt_shape or ("llama-7b" if cuda else "tiny")
    args.batch = args.batch or (4 if cuda else 1)
    args.seq = args.seq or (512 if cuda else 32)
    import torch

    torch_dtype = torch.bfloat16 if cuda else torch.float32
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    big = big_model_leg(args, torch_dtype)
    ckpt = checkpoint_leg(args, torch_dtype)
    print(f"{device_name}, torch {torch.__version__}")
    print(big["plan_table"])
    rows = [
        ("model", f"{args.shape}: {big['n_params'] / 1e9:.2f} B params, {big['weights_gib']:.1f} GiB"),
        ("build on device", f"{big['build_s']:.2f} s"),
        ("snapshot to host", f"{big['snapshot_to_host_s']:.2f} s ({big['snapshot_to_host_gb_s']:.1f} GB/s)"),
        ("restore / job", " ".join(f"{s:.3f}" for s in big["restore_s"])
         + f" s ({big['restore_gb_s'][-1]:.1f} GB/s)"),
        ("quantize / job", " ".join(f"{s:.3f}" for s in big["quantize_s"]) + " s (rtn nf4-b64)"),
        ("forward", f"{big['forward_tokens']} tokens in {big['forward_s']:.3f} s, "
         f"{big['forward_tflops']:.1f} TFLOP/s"
         + (f", MFU {big['mfu']:.1%}" if big["mfu"] is not None else "")),
        ("plan vs peak", f"{big['plan_gpu_gib']:.2f} GiB planned, "
         + (f"{big['max_memory_allocated_gib']:.2f} GiB allocated at peak" if cuda else "no CUDA peak")),
        ("checkpoint", f"{args.ckpt_shape} {ckpt['ckpt_gib']:.1f} GiB in {ckpt['shards']} shards: save "
         f"{ckpt['save_gb_s']:.2f} GB/s, load {ckpt['load_gb_s']:.2f} GB/s"),
        ("sharded path", f"devices {ckpt['sharded_devices']}, "
         f"restore bit-identical: {ckpt['sharded_restore_bit_identical']}"),
    ]  # fmt: skip
    for name, value in rows:
        print(f"  {name:<18} {value}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"device": device_name, "torch": torch.__version__, **big, **ckpt}
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if ckpt["sharded_restore_bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
