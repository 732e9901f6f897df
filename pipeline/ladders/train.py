"""Train one member of a model ladder: data preparation, the AdamW loop, held-out loss, saving.

`prepare_data` tokenizes a ladder's training text once and caches the tokenizer and token ids in
the ladder's folder; `train_member` trains one size on them and writes a Hugging Face checkpoint
(+ tokenizer + `kbitscale_ladder.json`) into a folder the caller then renames into place.
Everything is deterministic given the config: the same seed initializes every size and the same
permutation of training windows feeds every size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.ladders.configs import LadderConfig, ModelSize, config_hash
from pipeline.ladders.schedule import cosine_lr, wsd_lr

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

METADATA_FILE = "kbitscale_ladder.json"
CACHED_ARRAYS = ("train_ids.npy", "heldout_ids.npy")
N_TEXT_CHUNKS = 64  # the training slice is this many evenly spaced pieces of the training text


@dataclass(frozen=True)
class LadderData:
    """A ladder's tokenizer and its token ids (uint16/int32 arrays), shared by every size."""

    tokenizer: PreTrainedTokenizerFast
    train_ids: np.ndarray
    heldout_ids: np.ndarray


@dataclass(frozen=True)
class MemberMetadata:
    """What `kbitscale_ladder.json` records about one trained ladder member."""

    ladder: str
    size_name: str
    config_hash: str
    n_params: int
    non_embedding_params: int
    tokens_seen: int
    steps: int
    final_train_loss: float
    val_loss: float
    val_tokens: int
    wall_s: float
    device: str
    size: dict[str, int | str]
    config: dict[str, object]
    train_tokens: int | None = None  # tokens this member was trained on (None in folders before issue 21)
    branch: bool = False  # a wsd cool-down branch of the size's stable run
    cooldown_start_step: int | None = None  # the step a branch left the stable run at

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, folder: Path) -> MemberMetadata:
        return cls(**json.loads((folder / METADATA_FILE).read_text()))


def member_train_tokens(name_or_path: str) -> int | None:
    """The training tokens of the ladder member in folder `name_or_path` (None: not a ladder member)."""
    folder = Path(name_or_path)
    if not (folder / METADATA_FILE).is_file():
        return None
    meta = MemberMetadata.read(folder)
    return meta.tokens_seen if meta.train_tokens is None else meta.train_tokens


def chunk_text(text: str, max_chars: int | None, n_chunks: int = N_TEXT_CHUNKS) -> list[str]:
    """`n_chunks` pieces of `text`: all of it, or `max_chars` spread evenly over it."""
    if max_chars is None or max_chars >= len(text):
        size = -(-len(text) // n_chunks)
        return [text[start : start + size] for start in range(0, len(text), size)]
    stride, size = len(text) // n_chunks, max_chars // n_chunks
    return [text[i * stride : i * stride + size] for i in range(n_chunks)]


def encode(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> np.ndarray:
    """Token ids of `texts`, each followed by EOS (pieces are not contiguous), as one array."""
    pieces = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = np.fromiter((t for piece in pieces for t in [*piece, eos]), dtype=np.int64)
    return ids.astype(np.uint16 if len(tokenizer) <= 2**16 else np.int32)


def _save_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def prepare_data(config: LadderConfig, data_root: str | Path, ladder_dir: Path) -> LadderData:
    """Train the tokenizer and tokenize the corpus once; later calls read the cache in `ladder_dir`."""
    from transformers import PreTrainedTokenizerFast

    from pipeline.ladders.corpus import split_corpus
    from pipeline.ladders.tokenizer import train_tokenizer

    tok_dir, train_path, heldout_path = (
        ladder_dir / n for n in ("tokenizer", "train_ids.npy", "heldout_ids.npy")
    )
    if tok_dir.is_dir() and train_path.is_file() and heldout_path.is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
        return LadderData(tokenizer, np.load(train_path), np.load(heldout_path))
    start = time.perf_counter()
    train_text, heldout_text = split_corpus(data_root)
    chunks = chunk_text(train_text, config.max_train_chars)
    tokenizer = train_tokenizer(chunks, config.vocab_size)
    train_ids, heldout_ids = encode(tokenizer, chunks), encode(tokenizer, chunk_text(heldout_text, None))
    ladder_dir.mkdir(parents=True, exist_ok=True)
    _save_array(train_path, train_ids)
    _save_array(heldout_path, heldout_ids)
    tmp_tok = ladder_dir / f".tokenizer.{os.getpid()}.tmp"
    tokenizer.save_pretrained(tmp_tok)
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.replace(tmp_tok, tok_dir)
    log.info(
        "%s: tokenizer (vocab %d) and %d train / %d held-out tokens from %d characters in %.1f s",
        config.name, len(tokenizer), len(train_ids), len(heldout_ids), sum(map(len, chunks)),
        time.perf_counter() - start,
    )  # fmt: skip
    return LadderData(tokenizer, train_ids, heldout_ids)


def build_model(
    config: LadderConfig, size: ModelSize, tokenizer: PreTrainedTokenizerFast
) -> LlamaForCausalLM:
    """A freshly initialized Llama of `size`, seeded by the ladder's seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.d_model,
        num_hidden_layers=size.n_layers,
        num_attention_heads=size.n_heads,
        num_key_value_heads=size.n_heads,
        intermediate_size=size.d_ff,
        max_position_embeddings=config.seq_len,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(model_config)


def count_params(model: PreTrainedModel) -> tuple[int, int]:
    """(all parameters, parameters outside the input embedding and the LM head)."""
    embedding = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    return total, total - sum(p.numel() for p in params if id(p) in embedding)


def lr_at(step: int, config: LadderConfig, peak: float | None = None, keep_steps: int | None = None) -> float:
    """The ladder's learning rate at 0-based `step` (`pipeline.ladders.schedule`).

    Cosine: warm-up over `warmup_steps`, then cosine decay to `peak * min_lr_ratio` at `steps`. WSD:
    warm-up, then `peak` on the stable run, or the cool-down of the branch kept at `keep_steps`.
    `peak` defaults to the ladder's `lr`; a size may set its own (`ModelSize.lr`).
    """
    peak = config.lr if peak is None else peak
    if config.schedule == "wsd":
        return wsd_lr(step, config.warmup_steps, peak, config.min_lr_ratio, keep_steps, config.cooldown_frac)
    return cosine_lr(step, config.warmup_steps, config.steps, peak, config.min_lr_ratio)


def window_order(n_steps: int, batch_size: int, n_windows: int, seed: int) -> np.ndarray:
    """Training-window indices for `n_steps` steps: one seeded permutation per pass over the data.

    Depends only on the data and the ladder's seed, so every size sees the same windows in order.
    """
    needed = n_steps * batch_size
    epochs = [
        np.random.default_rng([seed, epoch]).permutation(n_windows)
        for epoch in range(-(-needed // n_windows))
    ]
    return np.concatenate(epochs)[:needed]


def _windows(ids: np.ndarray, seq_len: int, rows: np.ndarray) -> torch.Tensor:
    import torch

    starts = rows[:, None] * seq_len + np.arange(seq_len)[None, :]
    return torch.from_numpy(ids[starts].astype(np.int64))


def _autocast(device: torch.device) -> torch.autocast:
    import torch

    enabled = device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def evaluate_loss(model: LlamaForCausalLM, ids: np.ndarray, config: LadderConfig) -> tuple[float, int]:
    """(mean next-token loss in nats, tokens scored) over held-out windows spread evenly over `ids`."""
    import torch

    n_windows = len(ids) // config.seq_len
    if n_windows < 1:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than seq_len={config.seq_len}")
    n_eval = min(n_windows, (config.eval_tokens or len(ids)) // config.seq_len)
    rows = np.unique(np.linspace(0, n_windows - 1, n_eval).round().astype(np.int64))
    device = next(model.parameters()).device
    model.eval()
    total = 0.0
    with torch.no_grad(), _autocast(device):
        for start in range(0, len(rows), config.batch_size):
            batch = _windows(ids, config.seq_len, rows[start : start + config.batch_size]).to(device)
            total += model(input_ids=batch, labels=batch).loss.float().item() * len(batch)
    model.train()
    return total / len(rows), len(rows) * (config.seq_len - 1)


def make_optimizer(
    model: torch.nn.Module, config: LadderConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.95) with weight decay on matrices only; `run_steps` sets its lr each step."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def _log_progress(
    label: str,
    step: int,
    steps: range,
    config: LadderConfig,
    loss: float,
    lr: float,
    times: tuple[float, float, int],
) -> None:
    import torch

    start, last, last_step = times
    now = time.perf_counter()
    tokens_per_s = (step + 1 - last_step) * config.tokens_per_step / max(now - last, 1e-9)
    eta_s = (now - start) / (step + 1 - steps.start) * (steps.stop - step - 1)
    log.info(
        "%s step %d/%d loss %.3f lr %.2e %.0f tok/s ETA %dm%02ds (%d threads)",
        label, step + 1, steps.stop, loss, lr, tokens_per_s, eta_s // 60, eta_s % 60,
        torch.get_num_threads(),
    )  # fmt: skip


def cpu_threads(own_threads: int = 1) -> int:
    """Threads for CPU training: `$KBIT_TRAIN_THREADS`, else the cores other processes leave idle.

    Oversubscribed cores slow small-model training 5-20x (every op's threads wait at a barrier for
    a descheduled sibling), so under load one thread beats two. `own_threads` are this process's
    threads that may be counted as running now.
    """
    if os.environ.get("KBIT_TRAIN_THREADS"):
        return int(os.environ["KBIT_TRAIN_THREADS"])
    cores = len(os.sched_getaffinity(0))
    try:
        samples = []
        for _ in range(5):  # runnable threads right now, machine-wide (Linux)
            samples.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]))
            time.sleep(0.01)
    except (OSError, ValueError, IndexError):
        return cores
    others = max(0, sorted(samples)[len(samples) // 2] - own_threads)
    return max(1, min(cores, cores - others))


def train_loop(
    model: LlamaForCausalLM, train_ids: np.ndarray, config: LadderConfig, label: str, peak_lr: float
) -> float:
    """Train `model` in place for `config.steps` steps; returns the mean loss of the last 10% of steps."""
    device = next(model.parameters()).device
    order = window_order(
        config.steps, config.batch_size, check_windows(train_ids, config, label), config.seed
    )
    optimizer = make_optimizer(model, config, device)
    losses = run_steps(model, optimizer, train_ids, order, config, range(config.steps), label,
                       lambda step: lr_at(step, config, peak_lr))  # fmt: skip
    return float(np.mean(losses[-max(1, config.steps // 10) :]))


def check_windows(train_ids: np.ndarray, config: LadderConfig, label: str) -> int:
    """The number of training windows of `seq_len` tokens; ValueError when they do not fill a batch."""
    n_windows = len(train_ids) // config.seq_len
    if n_windows < config.batch_size:
        raise ValueError(f"{label}: {len(train_ids)} training tokens do not fill one batch")
    return n_windows


def run_steps(
    model: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    train_ids: np.ndarray,
    order: np.ndarray,
    config: LadderConfig,
    steps: range,
    label: str,
    lr_of: Callable[[int], float],
) -> list[float]:
    """Train `model` in place over the (0-based, global) `steps`, step s on the windows of `order`'s
    s-th batch at rate `lr_of(s)`; returns each step's training loss."""
    import torch

    device = next(model.parameters()).device
    losses: list[torch.Tensor] = []  # detached: no device sync per step
    start = last = time.perf_counter()
    last_step = steps.start
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_of(step)
        rows = order[step * config.batch_size : (step + 1) * config.batch_size]
        batch = _windows(train_ids, config.seq_len, rows).to(device, non_blocking=True)
        with _autocast(device):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if (step + 1) % config.log_every == 0 or step + 1 == steps.stop:
            _log_progress(label, step, steps, config, loss.item(), lr_of(step), (start, last, last_step))
            if device.type == "cpu":
                torch.set_num_threads(cpu_threads(torch.get_num_threads()))
            last, last_step = time.perf_counter(), step + 1
    return [loss.item() for loss in losses]


@contextlib.contextmanager
def training_device() -> Iterator[torch.device]:
    """The device to train on (CUDA when present, with TF32); on a CPU, the threads idle cores allow,
    restored afterwards."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield device
    finally:
        torch.set_num_threads(threads)


def member_metadata(
    config: LadderConfig,
    size: ModelSize,
    model: LlamaForCausalLM,
    steps: int,
    losses: tuple[float, float, int],
    wall_s: float,
    device: torch.device,
    cooldown_start_step: int | None = None,
) -> MemberMetadata:
    """The metadata of a member of `size` trained `steps` steps; `losses`: (final train loss, validation
    loss, validation tokens); `cooldown_start_step`: where a wsd branch left the stable run."""
    n_params, non_embedding = count_params(model)
    tokens = steps * config.tokens_per_step
    return MemberMetadata(
        ladder=config.name, size_name=size.name, config_hash=config_hash(config), n_params=n_params,
        non_embedding_params=non_embedding, tokens_seen=tokens, steps=steps, final_train_loss=losses[0],
        val_loss=losses[1], val_tokens=losses[2], wall_s=round(wall_s, 2), device=str(device),
        size=dataclasses.asdict(size), config=dataclasses.asdict(config), train_tokens=tokens,
        branch=cooldown_start_step is not None, cooldown_start_step=cooldown_start_step,
    )  # fmt: skip


def save_member(model: LlamaForCausalLM, data: LadderData, metadata: MemberMetadata, out_dir: Path) -> None:
    """Write `model` (moved to the CPU), the tokenizer and the metadata into `out_dir`."""
    model.to("cpu")  # type: ignore[arg-type]
    model.save_pretrained(out_dir)
    data.tokenizer.save_pretrained(out_dir)
    (out_dir / METADATA_FILE).write_text(metadata.to_json())


def train_member(config: LadderConfig, size: ModelSize, data: LadderData, out_dir: Path) -> MemberMetadata:
    """Train size `size` of `config` and save it (model, tokenizer, metadata) into `out_dir`."""
    label = f"{config.name}/{size.name}"
    with training_device() as device:
        start = time.perf_counter()
        model = build_model(config, size, data.tokenizer)
        model.to(device)  # type: ignore[arg-type]  # in place; transformers types .to oddly
        n_params, non_embedding = count_params(model)
        log.info("%s: %d parameters (%d non-embedding), %d tokens on %s", label, n_params, non_embedding,
                 config.tokens, device)  # fmt: skip
        train_loss = train_loop(model, data.train_ids, config, label, size.lr or config.lr)
        val_loss, val_tokens = evaluate_loss(model, data.heldout_ids, config)
        wall_s = time.perf_counter() - start
    log.info("%s: validation loss %.4f (train %.4f) after %.1f s", label, val_loss, train_loss, wall_s)
    metadata = member_metadata(
        config, size, model, config.steps, (train_loss, val_loss, val_tokens), wall_s, device
    )
    save_member(model, data, metadata, out_dir)
    return metadata
