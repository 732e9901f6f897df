"""Model-ladder configurations: Pythia-style families where only the model size changes.

Every size of a ladder sees the same tokens in the same order, with the same seed, optimizer and
learning-rate schedule. Configs are frozen and validated at construction; `config_hash` names a
ladder's cache folder, so changing any field that affects training trains a new ladder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from kernels.registry import unknown_name, unknown_name_message

SCHEMA_VERSION = 1
LADDER_PREFIX = "ladder:"  # sweeps name ladders `ladder:<name>[/<size>]`; results label members so
ARCHITECTURES = ("llama",)
# Fields that do not change what is trained, so they stay out of the hash.
_UNHASHED_FIELDS = ("log_every",)


@dataclass(frozen=True)
class ModelSize:
    """One rung of a ladder: a decoder-only transformer's shape."""

    name: str  # how sweeps name it: "ladder:<ladder>/<name>"
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int  # width of the gated MLP (Llama: gate, up and down projections)
    lr: float | None = None  # this size's peak learning rate (Pythia lowers it with size); None: ladder's

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or not self.name.isprintable():
            raise ValueError(f"size name must be a non-empty printable string without '/', got {self.name!r}")
        for field in ("d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} of size {self.name!r} must be >= 1, got {getattr(self, field)}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr of size {self.name!r} must be > 0 or None, got {self.lr}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} of size {self.name!r} is not divisible by n_heads={self.n_heads}"
            )

    @property
    def non_embedding_params(self) -> int:
        """Parameters outside the embedding and unembedding matrices (Llama, untied, no biases)."""
        per_layer = 4 * self.d_model**2 + 3 * self.d_model * self.d_ff + 2 * self.d_model
        return self.n_layers * per_layer + self.d_model  # + the final norm


@dataclass(frozen=True)
class LadderConfig:
    """A family of models trained identically except for their size."""

    name: str
    sizes: tuple[ModelSize, ...]  # smallest first
    vocab_size: int  # of the byte-level BPE trained on this ladder's training text
    seq_len: int  # tokens per training sequence; also the models' max_position_embeddings
    batch_size: int  # sequences per optimizer step
    steps: int  # optimizer steps per size
    lr: float  # peak learning rate (AdamW) of sizes that set none
    warmup_steps: int  # linear warm-up, then cosine decay to lr * min_lr_ratio at `steps`
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # on matrices only; norms are not decayed
    grad_clip: float = 1.0
    seed: int = 1234
    architecture: Literal["llama"] = "llama"
    max_train_chars: int | None = None  # a fixed, evenly spread slice of the training text; None: all
    eval_tokens: int | None = None  # held-out tokens scored for the validation loss; None: all
    log_every: int = 50  # steps between progress lines

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(self.sizes))
        if not self.sizes:
            raise ValueError(f"ladder {self.name!r} has no sizes")
        names = [size.name for size in self.sizes]
        if len(set(names)) != len(names):
            raise ValueError(f"ladder {self.name!r} repeats a size name: {names}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
        for field in ("vocab_size", "seq_len", "batch_size", "steps", "log_every"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} of ladder {self.name!r} must be >= 1, got {getattr(self, field)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        for field in ("max_train_chars", "eval_tokens"):
            value = getattr(self, field)
            if value is not None and value < self.seq_len:
                raise ValueError(f"{field}={value} must be None or >= seq_len={self.seq_len}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def tokens(self) -> int:
        """Training tokens every size sees."""
        return self.steps * self.tokens_per_step

    def size(self, name_or_index: str) -> ModelSize:
        """A size by name or by index ("0" is the smallest); KeyError lists the known ones."""
        for size in self.sizes:
            if size.name == name_or_index:
                return size
        if name_or_index.lstrip("-").isdigit() and -len(self.sizes) <= int(name_or_index) < len(self.sizes):
            return self.sizes[int(name_or_index)]
        sizes = [size.name for size in self.sizes]
        raise KeyError(
            unknown_name_message(f"size of ladder {self.name!r}", name_or_index, sizes)
            + f" (or an index 0..{len(self.sizes) - 1})"
        )


def config_hash(config: LadderConfig) -> str:
    """12 hex digits of sha256 over the canonical JSON of everything that shapes training."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _UNHASHED_FIELDS}
    canonical = json.dumps({"schema": SCHEMA_VERSION, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def smoke_config(config: LadderConfig, max_steps: int) -> LadderConfig:
    """A ladder cut to `max_steps` (and as many held-out tokens as one step sees), for smoke runs.

    Its hash differs from the full ladder's, so a smoke run never masquerades as the real ladder.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    steps = min(max_steps, config.steps)
    eval_tokens = min(config.eval_tokens or config.tokens_per_step, config.tokens_per_step)
    return dataclasses.replace(
        config, steps=steps, warmup_steps=min(config.warmup_steps, steps - 1), eval_tokens=eval_tokens
    )


def tuning_config(config: LadderConfig, *, lr: float | None = None, steps: int | None = None) -> LadderConfig:
    """A ladder with one peak learning rate for every size and/or another step count (10% warm-up).

    For learning-rate and length sweeps (`python -m pipeline.ladders h100 --lr 2e-3`): the hash changes,
    so a tuning run is cached beside the registered ladder, never in its place.
    """
    if lr is not None:
        config = dataclasses.replace(
            config, lr=lr, sizes=tuple(dataclasses.replace(s, lr=None) for s in config.sizes)
        )
    if steps is not None:
        config = dataclasses.replace(config, steps=steps, warmup_steps=steps // 10)
    return config


def _size(name: str, d_model: int, n_layers: int, head_dim: int = 64, lr: float | None = None) -> ModelSize:
    """A Llama-shaped size: heads of `head_dim`, MLP width ~8/3 d_model rounded up to 32."""
    d_ff = -(-(8 * d_model) // 3 // 32) * 32
    return ModelSize(name, d_model, n_layers, max(1, d_model // head_dim), d_ff, lr)


LADDERS: dict[str, LadderConfig] = {
    # Trains in seconds on a CPU: for tests only.
    "test": LadderConfig(
        name="test",
        sizes=(_size("xs", 16, 1, 8), _size("s", 32, 2, 16), _size("m", 64, 2, 16)),
        vocab_size=384,
        seq_len=64,
        batch_size=8,
        steps=100,
        lr=3e-3,
        warmup_steps=10,
        max_train_chars=200_000,
        eval_tokens=8_192,
        log_every=20,
    ),
    # A minute or two on a 2-core CPU (the demo's ladder before "demo"; tests and smoke sweeps use it).
    "tiny": LadderConfig(
        name="tiny",
        sizes=(_size("d16", 16, 1, 16), _size("d32", 32, 2, 32), _size("d64", 64, 2, 32)),
        vocab_size=1024,
        seq_len=256,
        batch_size=8,
        steps=250,
        lr=3e-3,
        warmup_steps=25,
        max_train_chars=2_000_000,
        eval_tokens=32_768,
    ),
    # The demo study's models (python -m pipeline.run): a 512-token vocabulary and wide 2-layer models,
    # so the quantized linear layers hold 62%, 75% and 82% of the parameters (tiny: 11-45%), and every
    # matrix holds > 1024 values (block sizes 64 and 1024 both differ from per-tensor). 400 steps
    # (819k tokens): at 200 the validation loss did not fall with size. Peak lr, tried at 200 steps: 2e-3
    # best of 1e-3..3e-3 for d192, better than 3e-3 for d128; 3e-3 better than 2e-3 for d64. About 1.5-3.5
    # min on 2 busy CPU cores; validation loss 3.65 / 3.55 / 3.44 nats.
    "demo": LadderConfig(
        name="demo",
        sizes=(_size("d64", 64, 2, 32, lr=3e-3), _size("d128", 128, 2, 32), _size("d192", 192, 2, 32)),
        vocab_size=512,
        seq_len=256,
        batch_size=8,
        steps=400,
        lr=2e-3,
        warmup_steps=40,
        max_train_chars=2_000_000,
        eval_tokens=32_768,
    ),
    # Minutes on one H100 (bf16 autocast): ~0.8M to ~38M non-embedding parameters. 1,200 steps of
    # 32k tokens (39M tokens, ~5 passes over the 7.6M-token corpus): at 600 steps every size was still
    # far from converged and the loss did not fall with size at any learning rate of 1e-3..4e-3
    # (docs/study-h100-ladder.md); 2e-3 was best or near it for the four largest sizes.
    "h100": LadderConfig(
        name="h100",
        sizes=(
            _size("d128", 128, 4),
            _size("d192", 192, 5),
            _size("d256", 256, 6),
            _size("d320", 320, 8),
            _size("d384", 384, 10),
            _size("d512", 512, 12),
        ),
        vocab_size=8192,
        seq_len=512,
        batch_size=64,
        steps=1200,
        lr=2e-3,
        warmup_steps=120,
        log_every=200,
    ),
}


def get_ladder(name: str) -> LadderConfig:
    """The registered ladder `name`; KeyError lists the known ones."""
    if name not in LADDERS:
        raise unknown_name("ladder", name, sorted(LADDERS))
    return LADDERS[name]
