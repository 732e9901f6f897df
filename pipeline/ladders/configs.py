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
from pipeline.ladders.schedule import cooldown_start

SCHEMA_VERSION = 1
LADDER_PREFIX = "ladder:"  # sweeps name ladders `ladder:<name>[/<size>]`; results label members so
ARCHITECTURES = ("llama",)
SCHEDULES = ("cosine", "wsd")
# Fields that do not change what is trained, so they stay out of the hash.
_UNHASHED_FIELDS = ("log_every",)
# Fields added after ladders were cached: hashed only when they differ from these defaults, so every
# ladder that does not use them keeps its hash (and its cache folder and its results' job keys).
_HASHED_UNLESS_DEFAULT = {"schedule": "cosine", "keep_tokens": [], "cooldown_frac": 0.2}


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
    warmup_steps: int  # linear warm-up, then the schedule's decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # on matrices only; norms are not decayed
    grad_clip: float = 1.0
    seed: int = 1234
    architecture: Literal["llama"] = "llama"
    max_train_chars: int | None = None  # a fixed, evenly spread slice of the training text; None: all
    eval_tokens: int | None = None  # held-out tokens scored for the validation loss; None: all
    log_every: int = 50  # steps between progress lines
    # "cosine": one member per size, cosine decay to `steps`. "wsd" (warmup-stable-decay): constant peak
    # lr, and for each kept token count T a cool-down branch over its last cooldown_frac * T tokens.
    schedule: Literal["cosine", "wsd"] = "cosine"
    keep_tokens: tuple[int, ...] = ()  # wsd: token counts kept as members (whole steps; the largest = steps)
    cooldown_frac: float = 0.2  # wsd: the fraction of each kept count spent decaying the lr

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(self.sizes))
        object.__setattr__(self, "keep_tokens", tuple(self.keep_tokens))
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
        self._check_schedule()

    def _check_schedule(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} of ladder {self.name!r} is not one of {SCHEDULES}")
        if self.schedule == "cosine":
            if self.keep_tokens:
                raise ValueError(
                    f"keep_tokens of ladder {self.name!r} needs schedule='wsd' (a cosine "
                    "decay to `steps` would confound the token count with the lr decay)"
                )
            return
        if not 0 < self.cooldown_frac < 1:
            raise ValueError(f"cooldown_frac must be in (0, 1), got {self.cooldown_frac}")
        keep = self.keep_tokens
        if not keep or list(keep) != sorted(set(keep)) or keep[0] < 1:
            raise ValueError(f"keep_tokens of wsd ladder {self.name!r} must be positive and strictly "
                             f"increasing, got {list(keep)}")  # fmt: skip
        odd = [t for t in keep if t % self.tokens_per_step]
        if odd:
            raise ValueError(f"keep_tokens {odd} of ladder {self.name!r} are not whole steps of "
                             f"{self.tokens_per_step} tokens (batch_size * seq_len)")  # fmt: skip
        if keep[-1] != self.tokens:
            raise ValueError(f"steps={self.steps} of wsd ladder {self.name!r} must be its largest kept count "
                             f"({keep[-1]} tokens = {keep[-1] // self.tokens_per_step} steps)")  # fmt: skip
        first_branch = cooldown_start(keep[0] // self.tokens_per_step, self.cooldown_frac)
        if self.warmup_steps > first_branch:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} of ladder {self.name!r} must end by the first "
                f"cool-down, which starts at step {first_branch}"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def tokens(self) -> int:
        """Training tokens every size sees."""
        return self.steps * self.tokens_per_step

    @property
    def keep_steps(self) -> tuple[int, ...]:
        """Optimizer steps of each kept member (wsd); () for a cosine ladder (one member at `steps`)."""
        return tuple(t // self.tokens_per_step for t in self.keep_tokens)

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
    fields = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(config).items()
        if k not in _UNHASHED_FIELDS
    }
    fields = {
        k: v
        for k, v in fields.items()
        if not (k in _HASHED_UNLESS_DEFAULT and _HASHED_UNLESS_DEFAULT[k] == v)
    }
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
    if config.schedule == "wsd":  # the kept counts within the cap (or one member at the cap)
        kept = [k for k in config.keep_steps if k <= steps] or [steps]
        first_branch = cooldown_start(kept[0], config.cooldown_frac)
        return dataclasses.replace(
            config, steps=kept[-1], warmup_steps=min(config.warmup_steps, first_branch),
            keep_tokens=tuple(k * config.tokens_per_step for k in kept), eval_tokens=eval_tokens,
        )  # fmt: skip
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
        if config.schedule == "wsd":
            raise ValueError(
                f"--steps does not apply to the wsd ladder {config.name!r}: its steps are its "
                f"largest kept count ({config.steps}); use --max-steps for a smoke run"
            )
        config = dataclasses.replace(config, steps=steps, warmup_steps=steps // 10)
    return config


def geometric_tokens(first: int, last: int, count: int, tokens_per_step: int) -> tuple[int, ...]:
    """`count` token counts geometric from `first` to `last`, each rounded to whole optimizer steps."""
    if count < 2 or not 0 < first < last:
        raise ValueError(f"need count >= 2 and 0 < first < last, got {count}, {first}, {last}")
    ratio = (last / first) ** (1 / (count - 1))
    return tuple(round(first * ratio**i / tokens_per_step) * tokens_per_step for i in range(count))


def tokens_ladder(
    base: LadderConfig, name: str, n_sizes: int, keep_tokens: tuple[int, ...], warmup_steps: int
) -> LadderConfig:
    """`base`'s smallest `n_sizes` sizes and settings on the wsd schedule, keeping `keep_tokens`."""
    return dataclasses.replace(
        base, name=name, sizes=base.sizes[:n_sizes], schedule="wsd", keep_tokens=keep_tokens,
        steps=keep_tokens[-1] // base.tokens_per_step, warmup_steps=warmup_steps, cooldown_frac=0.2,
    )  # fmt: skip


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


# The training-token axis (issue 21): members kept along one wsd run per size. test-tokens keeps 20, 40
# and 80 steps of `test` (10k-41k tokens) for tests. h100-tokens: the h100 ladder's four smallest sizes
# at six counts geometric from 2.5M to 40M tokens (76..1,221 steps of 32,768 tokens); the corpus holds
# ~7.6M training tokens, so the three largest counts repeat epochs (up to ~5.3 passes). Warm-up is 40
# steps (1.3M tokens), not h100's 120, so that it ends before the first cool-down (step 61).
LADDERS["test-tokens"] = tokens_ladder(LADDERS["test"], "test-tokens", 3, (10_240, 20_480, 40_960), 10)
LADDERS["h100-tokens"] = tokens_ladder(
    LADDERS["h100"], "h100-tokens", 4, geometric_tokens(2_500_000, 40_000_000, 6, 32_768), 40
)


def get_ladder(name: str) -> LadderConfig:
    """The registered ladder `name`; KeyError lists the known ones."""
    if name not in LADDERS:
        raise unknown_name("ladder", name, sorted(LADDERS))
    return LADDERS[name]
