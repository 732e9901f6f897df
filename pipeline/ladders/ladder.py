"""Pythia-style model ladders: trained once from the corpus, cached, and named by sweeps.

A sweep names a ladder as `ladder:<name>` (every size) or `ladder:<name>/<size name or index>`; a wsd
ladder keeps several members per size (`LadderConfig.keep_tokens`), which those names expand to, and
`@<tokens>` (`ladder:h100-tokens/d128@2.5M`, or every size: `ladder:h100-tokens@2.5M`) names one kept
count. `+seeds<N>` at the end (`ladder:h100+seeds3`) asks for N trainings of each size that differ only in
their seed (seed, seed+1, ...: initialization and data order), so that seed-to-seed variance is
measured; `resolve_ladder` turns a reference into checkpoint folders, training what is missing first.
Layout (each seed is its own ladder folder: the seed is part of the config hash):

    $KBIT_CACHE/ladders/<name>-<config hash>/      (KBIT_CACHE defaults to ~/.cache/kbitscale)
        tokenizer/, train_ids.npy, heldout_ids.npy   shared by every size, made once
        <size name>/                                 save_pretrained + tokenizer + kbitscale_ladder.json
        <size name>@<tokens>/                        the same, per kept count of a wsd ladder

Each member is trained in a hidden temporary folder and renamed into place when complete, so a
crash never leaves half a member, and a member whose folder exists is never trained again.
CLI: `python -m pipeline.ladders <name> [--data-root DIR] [--force] [--size NAME] [--seeds N]
[--max-steps N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.fingerprint import cache_base
from pipeline.ladders.branches import train_branches
from pipeline.ladders.configs import (
    LADDERS,
    LadderConfig,
    ModelSize,
    config_hash,
    get_ladder,
    smoke_config,
    tuning_config,
)
from pipeline.ladders.corpus import corpus_files
from pipeline.ladders.refs import (  # noqa: F401  (re-exported: callers import them from here)
    SEEDS_SUFFIX,
    MemberKey,
    format_tokens,
    is_ladder_ref,
    parse_ladder_ref,
    parse_member_ref,
    parse_seeded_members,
    parse_seeded_ref,
    seed_configs,
    split_seeds,
)
from pipeline.ladders.train import (
    CACHED_ARRAYS,
    METADATA_FILE,
    LadderData,
    MemberMetadata,
    prepare_data,
    train_member,
)

log = logging.getLogger(__name__)

DEFAULT_DATA_ROOT = "../shared/data"


@dataclass(frozen=True)
class LadderMember:
    """One trained size of a ladder, loadable with `AutoModelForCausalLM.from_pretrained(path)`."""

    path: str
    family: str  # the ladder's name
    size_name: str
    n_params: int
    non_embedding_params: int
    tokens_seen: int
    val_loss: float  # mean next-token loss (nats) on the corpus's held-out split

    @property
    def name(self) -> str:
        """The member's name in its ladder (its folder): the size, plus `@<tokens>` for a kept count."""
        return Path(self.path).name


def default_data_root() -> str:
    """`$KBIT_DATA_ROOT`, else `../shared/data` (relative to the working directory)."""
    return os.environ.get("KBIT_DATA_ROOT", DEFAULT_DATA_ROOT)


def cache_root(cache: str | Path | None = None) -> Path:
    """Where ladders live: `<cache>/ladders`; `cache` defaults to `$KBIT_CACHE` or ~/.cache/kbitscale."""
    return (Path(cache).expanduser() if cache else cache_base()) / "ladders"


def ladder_dir(config: LadderConfig, cache: str | Path | None = None) -> Path:
    """The folder of ladder `config` (its name and config hash)."""
    return cache_root(cache) / f"{config.name}-{config_hash(config)}"


def member_from_folder(folder: Path) -> LadderMember:
    """The `LadderMember` a trained folder describes (from its `kbitscale_ladder.json`)."""
    meta = MemberMetadata.read(folder)
    return LadderMember(
        path=str(folder), family=meta.ladder, size_name=meta.size_name, n_params=meta.n_params,
        non_embedding_params=meta.non_embedding_params, tokens_seen=meta.tokens_seen, val_loss=meta.val_loss,
    )  # fmt: skip


@contextlib.contextmanager
def _locked(folder: Path, name: str = "") -> Iterator[None]:
    """Hold an exclusive lock on `folder` (or on its member `name`) so concurrent runs train each once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".lock{'-' + name if name else ''}", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    """Remove a folder or file by renaming it aside first, so it vanishes atomically."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash) if trash.is_dir() else trash.unlink()


def _clean_stale(folder: Path, *patterns: str) -> None:
    """Drop what crashed runs left under `patterns` (safe: we hold the lock that guards them)."""
    for stale in (path for pattern in patterns for path in folder.glob(pattern)):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def train_ladder(
    config: LadderConfig,
    data_root: str | Path,
    sizes: Sequence[ModelSize] | None = None,
    *,
    force: bool = False,
    cache: str | Path | None = None,
) -> list[LadderMember]:
    """Train the missing members of `sizes` (default: all) of `config` and return them, smallest first
    (a wsd ladder's members of a size by token count).

    The ladder's data is prepared under a lock on the ladder; each size trains under its own
    lock, so processes given different sizes (one per GPU) train them at the same time.

    Args:
        config: the ladder.
        data_root: folder holding `corpus/` (see `pipeline.ladders.corpus`).
        sizes: the sizes wanted; members already trained are reused.
        force: retrain these sizes and re-tokenize, replacing what the cache holds.
        cache: the cache base folder (default `$KBIT_CACHE` or ~/.cache/kbitscale).
    """
    counts = config.keep_tokens or (None,)
    keys = [MemberKey(size, t) for size in (sizes if sizes is not None else config.sizes) for t in counts]
    return train_members(config, data_root, keys, force=force, cache=cache)


def train_members(
    config: LadderConfig,
    data_root: str | Path,
    keys: Sequence[MemberKey],
    *,
    force: bool = False,
    cache: str | Path | None = None,
) -> list[LadderMember]:
    """Train the missing members `keys` of `config` (see `train_ladder`) and return them in order."""
    folder = ladder_dir(config, cache)
    with _locked(folder):
        # prepare_data's temporaries and trash of the shared data (written only under this lock)
        _clean_stale(folder, ".*.tmp", *(f".trash-{path}-*" for path in ("tokenizer", *CACHED_ARRAYS)))
        if force:
            for path in ("tokenizer", *CACHED_ARRAYS, *(key.folder for key in keys)):
                _remove(folder / path)
        missing = missing_members(config, keys, cache)
        if missing:
            log.info(
                "ladder %s: training %s into %s", config.name, ", ".join(k.folder for k in missing), folder
            )
            data = prepare_data(config, data_root, folder)
    for size in dict.fromkeys(key.size for key in missing):
        with _locked(folder, size.name):
            # another process may have trained some meanwhile
            todo = missing_members(config, [key for key in missing if key.size == size], cache)
            if todo:
                _train_size(config, size, data, folder, todo)
    return [member_from_folder(folder / key.folder) for key in keys]


def _train_size(
    config: LadderConfig, size: ModelSize, data: LadderData, folder: Path, keys: Sequence[MemberKey]
) -> None:
    """Train `keys` (members of `size`) in hidden temporary folders, then rename each into place."""
    _clean_stale(folder, f".tmp-{size.name}[-@]*", f".trash-{size.name}[-@]*")
    tmps = {key.folder: folder / f".tmp-{key.folder}-{os.getpid()}" for key in keys}
    for tmp in tmps.values():
        tmp.mkdir()
    if config.schedule == "wsd":
        train_branches(
            config, size, data, {t: tmps[k.folder] for k in keys if (t := k.train_tokens) is not None}
        )
    else:
        train_member(config, size, data, tmps[size.name])
    for name, tmp in tmps.items():
        _remove(folder / name)  # a folder without metadata is an incomplete member
        os.replace(tmp, folder / name)


def missing_members(
    config: LadderConfig, keys: Sequence[MemberKey], cache: str | Path | None = None
) -> list[MemberKey]:
    """The members `keys` of `config` not trained yet in the cache."""
    folder = ladder_dir(config, cache)
    return [key for key in keys if not (folder / key.folder / METADATA_FILE).is_file()]


def missing_sizes(
    config: LadderConfig, sizes: Sequence[ModelSize], cache: str | Path | None = None
) -> list[ModelSize]:
    """The `sizes` of `config` with a member not trained yet in the cache."""
    keys = [MemberKey(size, t) for size in sizes for t in config.keep_tokens or (None,)]
    return list(dict.fromkeys(key.size for key in missing_members(config, keys, cache)))


def check_ladder_data(name_or_path: str, data_root: str | Path, cache: str | Path | None = None) -> None:
    """Raise FileNotFoundError if the ladder reference names members not trained yet and `data_root`
    holds no corpus to train them from (KeyError: an unknown ladder or size; ValueError: a bad `@`)."""
    missing = [
        key
        for config, keys in parse_seeded_members(name_or_path)
        for key in missing_members(config, keys, cache)
    ]
    if missing:
        try:
            corpus_files(data_root)
        except FileNotFoundError as err:
            names = ", ".join(key.folder for key in missing)
            message = f"{name_or_path}: {names} not trained yet, and no corpus to train them from ({err})"
            raise FileNotFoundError(message) from err


def cached_ladder(name_or_path: str, cache: str | Path | None = None) -> list[LadderMember] | None:
    """The members a ladder reference names if every one is already trained, else None (trains nothing)."""
    seeded = parse_seeded_members(name_or_path)
    if any(missing_members(config, keys, cache) for config, keys in seeded):
        return None
    return [
        member_from_folder(ladder_dir(config, cache) / key.folder) for config, keys in seeded for key in keys
    ]


def resolve_ladder(
    name_or_path: str, data_root: str | Path | None = None, cache: str | Path | None = None
) -> list[LadderMember]:
    """The members a ladder reference names, training any that are missing (first use only).

    Args:
        name_or_path: `ladder:<name>` (every size) or `ladder:<name>/<size name or index>`, optionally
            `@<tokens>` (one kept count of a wsd ladder; without it, every kept count) and
            `+seeds<N>` (every seed's members, seed by seed).
        data_root: folder holding `corpus/`; default `$KBIT_DATA_ROOT` or ../shared/data.
        cache: the cache base folder (default `$KBIT_CACHE` or ~/.cache/kbitscale).

    Raises:
        KeyError: unknown ladder or size (the message lists the known ones).
        ValueError: `name_or_path` is not a ladder reference, or names a count the ladder does not keep.
    """
    root = data_root or default_data_root()
    return [
        member
        for config, keys in parse_seeded_members(name_or_path)
        for member in train_members(config, root, keys, cache=cache)
    ]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ladders", description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", help=f"ladder to train: one of {', '.join(LADDERS)}")
    parser.add_argument("--list", action="store_true", help="list the ladders and their sizes, then exit")
    parser.add_argument("--data-root", default=None, help="folder holding corpus/ (default ../shared/data)")
    parser.add_argument(
        "--cache", default=None, help="cache base folder (default $KBIT_CACHE or ~/.cache/kbitscale)"
    )
    parser.add_argument("--size", action="append", help="train only this size (name or index); repeatable")
    parser.add_argument(
        "--seeds", type=int, default=1, help="train N seeds of each size (seed, seed+1, ...); sweeps name "
        f"them as ladder:<name>{SEEDS_SUFFIX}<N>"
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="retrain (and re-tokenize) even if cached")
    parser.add_argument("--max-steps", type=int, help="smoke run: cap the steps (a separate cached ladder)")
    parser.add_argument("--max-chars", type=int, help="smoke run: cap the training characters")
    parser.add_argument(
        "--lr",
        type=float,
        help="tuning run: this peak learning rate for every size (a separately cached ladder)",
    )
    parser.add_argument(
        "--steps", type=int, help="tuning run: this many optimizer steps, 10%% warm-up (separately cached)"
    )
    args = parser.parse_args(argv)
    if not args.list and not args.name:
        parser.error("give a ladder name or --list")
    return args


def _describe(config: LadderConfig) -> str:
    sizes = ", ".join(f"{s.name} ({s.non_embedding_params / 1e6:.2f}M)" for s in config.sizes)
    if config.keep_tokens:
        kept = ", ".join(format_tokens(t) for t in config.keep_tokens)
        return f"{config.name}: wsd, members kept at {kept} tokens per size; sizes {sizes}"
    return f"{config.name}: {config.tokens / 1e6:.1f}M tokens per size; sizes {sizes}"


def main(argv: Sequence[str] | None = None) -> int:
    """Train (or reuse) a ladder and print one line per member; exit code 2 on a bad name or data root."""
    args = _parse_args(argv)
    if args.list:
        print("\n".join(_describe(config) for config in LADDERS.values()))
        return 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    try:
        config = _cli_config(args)
        if args.seeds < 1:
            raise ValueError(f"--seeds {args.seeds} is not allowed; use an integer >= 1")
        configs = seed_configs(config, args.seeds)
        sizes = [config.size(s) for s in args.size] if args.size else None
        data_root = args.data_root or default_data_root()
        if args.force or any(missing_sizes(c, sizes or c.sizes, args.cache) for c in configs):
            corpus_files(data_root)  # before any lock or folder is made
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    members = [
        member
        for c in configs
        for member in train_ladder(c, data_root, sizes, force=args.force, cache=args.cache)
    ]
    print(f"{'size':<8} {'params':>12} {'non-emb':>12} {'tokens':>12} {'val loss':>9}  path")
    for m in members:
        print(f"{m.name:<8} {m.n_params:>12,} {m.non_embedding_params:>12,} {m.tokens_seen:>12,} "
              f"{m.val_loss:>9.4f}  {m.path}")  # fmt: skip
    return 0


def _cli_config(args: argparse.Namespace) -> LadderConfig:
    """The registered ladder the CLI names, with its smoke or tuning changes (KeyError, ValueError)."""
    config = get_ladder(args.name)
    if args.max_chars is not None:
        config = dataclasses.replace(config, max_train_chars=args.max_chars)
    if args.lr is not None or args.steps is not None:
        config = tuning_config(config, lr=args.lr, steps=args.steps)
    if args.max_steps is not None:
        config = smoke_config(config, args.max_steps)
    return config


if __name__ == "__main__":
    sys.exit(main())
