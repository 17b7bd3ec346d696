"""Stage-2 training data: the token files, what they imply for the generator, and this rank's rows per epoch.

The training file (``data.train``, written by ``mergevq encode``) decides the task: codebook bits, grid, classes, the
tokenizer identity (stored in the generator config, so ``mergevq sample`` can refuse another tokenizer) and, for
MergeAR and RandAR, the merge levels (every stored K below L unless ``data.num_tokens`` lists them). Vanilla AR and
MaskGIT train on K = L, which the file must store. The whole file is held in host memory in its compact dtypes
(:class:`~mergevq.data.tokens.TokenDataset`); the loop moves each batch to the device, so accelerator memory holds only
the batch.

Labels: a file whose labels are all -1 (an encoded flat folder) trains a one-class generator (class 0, plus the null
class of classifier-free guidance); a file mixing -1 with real labels is refused.

Every problem is a one-line :class:`~mergevq.train.config_io.ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from mergevq.data.images import EpochSampler, SkipBatchSampler
from mergevq.data.tokens import TokenDataset, TokenFile, check_same_tokenizer, load_tokens, tokenizer_identity
from mergevq.generator import GeneratorConfig
from mergevq.generator.config import MERGE_LEVEL_KINDS
from mergevq.train.config_io import ConfigError
from mergevq.train.generator_recipe import GeneratorTrainConfig
from mergevq.train.merge_sampling import MergeCountSampler

__all__ = ["RowLoader", "ShardSampler", "TokenSource", "merge_level_sampler", "read_token_source"]


class ShardSampler(Sampler[int]):
    """Rows of epoch e: a permutation from ``derive_seed(seed, e)``, every ``world_size``-th from ``rank``.

    The tail that does not divide evenly is dropped, so the ranks' shards are disjoint and equally long.
    """

    def __init__(self, num_rows: int, *, seed: int, rank: int, world_size: int) -> None:
        self.order = EpochSampler(num_rows, shuffle=True, seed=seed)
        self.rank, self.world_size = rank, world_size
        self.per_rank = num_rows // world_size

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        rows = list(self.order)[: self.per_rank * self.world_size]
        return iter(rows[self.rank :: self.world_size])

    def __len__(self) -> int:
        return self.per_rank


class RowLoader:
    """Batches of row indices ``[B]`` for :class:`~mergevq.train.runtime.BatchStream` (no DataLoader needed: the
    tokens are already in memory, :meth:`TokenDataset.batch` gathers them)."""

    dataset = None  # what set_loader_epoch would forward the epoch to; rows need no per-epoch state

    def __init__(self, num_rows: int, *, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        shard = ShardSampler(num_rows, seed=seed, rank=rank, world_size=world_size)
        self.batch_sampler = SkipBatchSampler(shard, batch_size=batch_size, drop_last=True)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Tensor]:
        return (torch.tensor(rows, dtype=torch.long) for rows in self.batch_sampler)


@dataclasses.dataclass
class TokenSource:
    """The checked token files of a run and the generator configuration they imply."""

    train: TokenDataset
    val: TokenDataset | None
    levels: tuple[int, ...]  # the K trained: the merge levels (MergeAR, RandAR), or (L,) (vanilla AR, MaskGIT)
    unlabelled: bool  # every label is -1: one class (0)
    model_config: GeneratorConfig


# What the errors call each kind.
_KIND_NAMES = {"ar": "vanilla AR", "mergear": "MergeAR", "randar": "RandAR", "maskgit": "MaskGIT"}


def _load(path: str, key: str) -> TokenFile:
    try:
        return load_tokens(path, compact=True)  # int64 only per batch: a third of the memory
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def _levels(config: GeneratorTrainConfig, tokens: TokenFile) -> tuple[int, ...]:
    length, available, path = tokens.num_positions, list(tokens.num_tokens_available), config.data.train
    wanted, kind = config.data.num_tokens, _KIND_NAMES[config.model.kind]
    if config.model.kind not in MERGE_LEVEL_KINDS:
        if wanted is not None and sorted(set(wanted)) != [length]:
            raise ConfigError(f"data.num_tokens: {kind} trains on all L={length} positions; set null or [{length}]")
        if length not in available:
            raise ConfigError(
                f"data.train: {kind} needs K = L = {length} tokens per image, but token file {path} holds K "
                f"{available}; encode with --num-tokens ... {length}"
            )
        return (length,)
    if wanted is None:
        levels = tuple(k for k in available if k < length)
        if not levels:
            raise ConfigError(
                f"data.train: {kind} needs merged tokens (K < L = {length}), but token file {path} holds only K "
                f"{available}; encode with several --num-tokens or list the levels in data.num_tokens"
            )
        return levels
    for k in sorted(set(wanted)):
        if k not in tokens.entries:
            raise ConfigError(f"data.num_tokens: token file {path} holds no K={k} tokens; available K: {available}")
    return tuple(sorted(set(wanted)))


def _num_classes(tokens: TokenFile, path: str) -> tuple[int, bool]:
    """(classes, unlabelled) of the training file."""
    labels = tokens.labels
    missing = labels < 0
    if len(labels) and bool(missing.all()):
        return 1, True
    if bool(missing.any()):
        raise ConfigError(
            f"data.train: token file {path} mixes unlabelled (-1) and labelled images ({int(missing.sum())} of "
            f"{len(labels)} unlabelled); encode a class-folder dataset or a flat folder, not both"
        )
    seen = int(labels.max()) + 1 if len(labels) else 0
    recorded = tokens.meta.get("num_classes")
    if isinstance(recorded, int) and recorded > 0:
        if seen > recorded:
            raise ConfigError(f"data.train: token file {path} has label {seen - 1} but records num_classes={recorded}")
        return recorded, False
    return seen, False


def _grid(meta: dict[str, Any], length: int, path: str) -> tuple[int, int]:
    grid = meta.get("grid")
    if grid is None:  # older files: a square grid
        side = math.isqrt(length)
        if side * side != length:
            raise ConfigError(f"data.train: token file {path} records no grid and L={length} is not a square")
        grid = [side, side]
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(g, int) for g in grid)):
        raise ConfigError(f"data.train: token file {path} records a bad grid {grid!r} (expected [h, w])")
    if grid[0] * grid[1] != length:
        raise ConfigError(f"data.train: token file {path} records grid {grid} but holds L={length} positions")
    return grid[0], grid[1]


def read_token_source(config: GeneratorTrainConfig) -> TokenSource:
    """The training (and validation) token files, checked, and the generator config they imply."""
    path = config.data.train
    tokens = _load(path, "data.train")
    bits = tokens.meta.get("codebook_bits")
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise ConfigError(f"data.train: token file {path} records no codebook_bits (write it with mergevq encode)")
    levels = _levels(config, tokens)
    num_classes, unlabelled = _num_classes(tokens, path)
    overrides = dict(config.model.overrides)
    if "num_classes" in overrides and overrides["num_classes"] < num_classes:
        raise ConfigError(
            f"model.overrides.num_classes: {overrides['num_classes']} is fewer than the {num_classes} classes of "
            f"token file {path}"
        )
    task: dict[str, Any] = {
        "kind": config.model.kind,
        "codebook_bits": bits,
        "grid": _grid(tokens.meta, tokens.num_positions, path),
        "num_classes": num_classes,
        "tokenizer": tokenizer_identity(tokens.meta),
    }
    if config.model.kind in MERGE_LEVEL_KINDS:
        task["merge_levels"] = levels
    try:
        model_config = GeneratorConfig.from_preset(config.model.preset, **{**task, **overrides})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None

    val = None
    if config.data.val:
        val_file = _load(config.data.val, "data.val")
        try:
            check_same_tokenizer(
                val_file.meta, tokens.meta, what_a=f"data.val {config.data.val}", what_b=f"data.train {path}"
            )
            for k in levels:
                val_file.get(num_tokens=k)
        except ValueError as e:
            raise ConfigError(f"data.val: {e}") from None
        labels = val_file.labels
        if not unlabelled and len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise ConfigError(
                f"data.val: token file {config.data.val} has labels outside the training classes [0, {num_classes})"
            )
        val = TokenDataset(val_file, num_tokens=levels)
    train_set = TokenDataset(tokens, num_tokens=levels)
    return TokenSource(train=train_set, val=val, levels=levels, unlabelled=unlabelled, model_config=model_config)


def merge_level_sampler(config: GeneratorTrainConfig, tokens: TokenSource) -> MergeCountSampler | None:
    """K per step over the merge levels (``merge.candidates: null`` = the levels) for MergeAR and RandAR; None for
    the kinds that train on K = L."""
    if config.model.kind not in MERGE_LEVEL_KINDS:
        return None
    merge, levels = config.merge, tokens.levels
    if merge.candidates is None and merge.distribution in ("exponential", "gaussian", "uniform"):
        merge = dataclasses.replace(merge, candidates=list(levels))
    try:
        sampler = MergeCountSampler(
            config=merge,
            num_tokens_full=tokens.train.num_positions,
            default_num_tokens=min(levels),
            seed=config.seed,
        )
    except ValueError as e:
        raise ConfigError(f"merge: {e}") from None
    outside = [k for k in sampler.candidates if k not in levels]
    if outside:
        raise ConfigError(f"merge: K={outside[0]} is not one of the merge levels {list(levels)} (data.num_tokens)")
    return sampler
