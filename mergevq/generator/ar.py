"""Vanilla raster-order AR (LlamaGen) and the token-by-token raster decoder shared with MergeAR.

Sequence ``[cls, x_0 … x_{L−2}]`` predicts ``x_0 … x_{L−1}``: the state at the class token predicts ``x_0``, the state
at ``x_j`` predicts ``x_{j+1}``. Image token ``x_j`` is rotated by its grid cell ``(j // w, j % w)``; the class token is
not rotated. Plain causal attention.

Decoding (:class:`RasterDecoder`): prefill the prefix, then feed one token per step. With a cache each step costs one
new token through the stack; without one (``use_cache=False``) every step recomputes the whole sequence with the
training mask, the reference that the cached path must reproduce.

A *scheme* (:class:`RasterAR` here; MergeAR, RandAR and MaskGIT in their modules) owns its kind's training loss
(:meth:`RasterAR.loss`) and its generation loop (:meth:`RasterAR.generate`); :class:`~mergevq.generator.Generator`
holds the shared weights and dispatches to it.

Einstein legend:
    B   batch (doubled under classifier-free guidance)
    P   prefix tokens (class, and MergeAR's merge instruction)
    N   image tokens in the sequence
    L   raster positions, C width
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mergevq.generator.config import GeneratorConfig, find_multiple
from mergevq.generator.gpt import KVCache
from mergevq.generator.kv_cache import StaticKVCache
from mergevq.generator.outputs import GenerationOutput, GeneratorOutput, generation_stats
from mergevq.generator.sampling import Sampler

if TYPE_CHECKING:
    from mergevq.generator.model import Generator

__all__ = ["RasterAR", "RasterDecoder", "check_full_grid", "raster_positions", "steps_of"]


def raster_positions(grid: tuple[int, int], *, device: torch.device | str | None = None) -> Tensor:
    """``[L, 2]`` (row, col) of the raster positions of an ``h × w`` grid."""
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij"
    )
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)


def check_full_grid(num_tokens: int | None, *, length: int, what: str) -> int:
    """K for a scheme that models every raster position (K = L; None means L)."""
    if num_tokens is None:
        return length
    if num_tokens != length:
        raise ValueError(
            f"{what} models all L={length} raster tokens, so num_tokens must be {length} (got {num_tokens}); "
            "use kind='mergear' or 'randar' to train on merged (K-sparse) targets"
        )
    return num_tokens


def steps_of(progress: bool, steps: range, *, unit: str) -> range:
    """``steps``, wrapped in a progress bar when asked."""
    if not progress:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc="generate", unit=unit)


class RasterAR:
    """The vanilla scheme: class-token prefix, causal mask, static cache."""

    num_prefix = 1

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config

    def check_num_tokens(self, num_tokens: int | None) -> int:
        """K for this scheme (vanilla AR models every position: K = L)."""
        return check_full_grid(num_tokens, length=self.config.num_positions, what="vanilla AR")

    def prefix(self, model: Generator, labels_B: Tensor, num_tokens: int) -> Tensor:
        """``[B, P, C]`` prefix embeddings."""
        return model.class_embedding(labels_B)[:, None]

    def attention_mask(self, values_BN: Tensor) -> Tensor | None:
        """Full-sequence mask over ``prefix + N`` image tokens; None = plain causal."""
        return None

    def new_cache(
        self,
        model: Generator,
        *,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
        num_tokens: int | None = None,
    ) -> KVCache:
        config = self.config
        return StaticKVCache(
            num_layers=config.depth,
            batch_size=batch_size,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            capacity=find_multiple(self.num_prefix + config.num_positions - 1, 8),
            dtype=dtype,
            device=device,
        )

    # ------------------------------------------------------------------ training
    def loss(
        self,
        model: Generator,
        *,
        indices: Tensor,
        assignment: Tensor,
        labels: Tensor,
        num_tokens: int,
        return_logits: bool = False,
    ) -> GeneratorOutput:
        """Every raster position of ``target [B, L] = indices.gather(1, assignment)`` is supervised.

        ``labels`` are already dropped for CFG; ``num_tokens`` is checked.
        """
        target_BL = indices.long().gather(1, assignment.long())
        x_BSC = torch.cat([self.prefix(model, labels, num_tokens), model.codes.embed(target_BL[:, :-1])], dim=1)
        p = self.num_prefix
        none_P2 = torch.full((p, 2), -1, dtype=torch.long, device=model.grid_positions.device)
        positions_1S2 = torch.cat([none_P2, model.grid_positions[:-1]])[None]
        h_BSC = model.trunk(x_BSC, positions_BS2=positions_1S2, mask=self.attention_mask(target_BL[:, :-1]))
        h_BLC = h_BSC[:, p - 1 :]  # the states predicting x_0 … x_{L−1}
        losses = model.codes.loss(h_BLC, target_BL, label_smoothing=self.config.label_smoothing)
        loss = losses.pop("loss")
        logits = model.codes.logits(h_BLC, target_BL) if return_logits else None
        return GeneratorOutput(loss, losses, logits)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        model: Generator,
        *,
        labels: Tensor,
        num_tokens: int | None,
        sampler: Sampler,
        steps: int | None = None,
        tome_ratio: float = 0.0,
        use_cache: bool = True,
        progress: bool = False,
    ) -> GenerationOutput:
        """L raster steps, one token each; ``[B, L]`` grid with the identity assignment."""
        from mergevq.generator.mergear import groups_from_values

        if steps is not None:
            raise ValueError(f"steps applies to RandAR and MaskGIT; a {self.config.kind!r} generator decodes L tokens")
        if tome_ratio:
            raise ValueError(f"tome_ratio applies to MaskGIT only, not to a {self.config.kind!r} generator")
        batch, length = labels.shape[0], self.config.num_positions
        guide = sampler.guide
        labels_in = torch.cat([labels, torch.full_like(labels, self.config.null_class)]) if guide else labels
        start = time.perf_counter()
        dec = RasterDecoder(model, labels=labels_in, num_tokens=num_tokens, use_cache=use_cache)
        tokens_BL = torch.empty(batch, length, dtype=torch.long, device=labels.device)
        h_BC = dec.start()
        for t in steps_of(progress, range(length), unit="tok"):
            choose = sampler.choose(sampler.weight(t / (length - 1) if length > 1 else 1.0))
            token_B = model.codes.sample(h_BC, choose=choose)
            tokens_BL[:, t] = token_B
            if t < length - 1:
                h_BC = dec.feed(torch.cat([token_B, token_B]) if guide else token_B)
        stats = generation_stats(
            seconds=time.perf_counter() - start,
            batch=batch,
            tokens=length,
            forward_passes=dec.forward_passes,
            peak_cache_bytes=dec.peak_cache_bytes,
            distinct_groups=groups_from_values(tokens_BL).counts,
        )
        identity_BL = torch.arange(length, device=tokens_BL.device).expand(batch, length).clone()
        return GenerationOutput(tokens_BL, identity_BL, stats)


class RasterDecoder:
    """Feeds raster tokens one at a time; :meth:`start` and :meth:`feed` return the state predicting the next token.

    Under classifier-free guidance pass the doubled labels (conditional rows first) and feed each token to both halves.
    """

    def __init__(
        self, model: Generator, *, labels: Tensor, num_tokens: int | None = None, use_cache: bool = True
    ) -> None:
        self.model, self.scheme = model, model.scheme
        self.num_tokens = self.scheme.check_num_tokens(num_tokens)
        self.prefix_BPC = self.scheme.prefix(model, labels, self.num_tokens)
        self.positions_L2 = model.grid_positions
        batch, device, dtype = labels.shape[0], self.prefix_BPC.device, self.prefix_BPC.dtype
        self.cache = (
            self.scheme.new_cache(model, batch_size=batch, dtype=dtype, device=device, num_tokens=self.num_tokens)
            if use_cache
            else None
        )
        self.values: list[Tensor] = []  # fed image tokens, [B] each
        self.forward_passes = 0

    @property
    def num_prefix(self) -> int:
        return self.prefix_BPC.shape[1]

    @property
    def peak_cache_bytes(self) -> int:
        return getattr(self.cache, "peak_bytes", 0)

    def _positions(self, start: int, stop: int) -> Tensor:
        """(row, col) of sequence slots ``[start, stop)``: −1 for prefix slots, the grid cell for image tokens."""
        none_P2 = torch.full((self.num_prefix, 2), -1, dtype=torch.long, device=self.positions_L2.device)
        return torch.cat([none_P2, self.positions_L2])[start:stop][None]

    def _run(self, x_BSC: Tensor, values_BS: Tensor) -> Tensor:
        self.forward_passes += 1
        if self.cache is None:  # the reference: recompute the whole sequence with the training mask
            image_BN = torch.stack(self.values, dim=1) if self.values else values_BS[:, :0]
            x_BSC = torch.cat([self.prefix_BPC, self.model.codes.embed(image_BN)], dim=1)
            mask = self.scheme.attention_mask(image_BN)
            h_BSC = self.model.trunk(x_BSC, positions_BS2=self._positions(0, x_BSC.shape[1]), mask=mask)
            return h_BSC[:, -1]
        start = self.cache.length
        mask = self.cache.begin(values_BS)
        positions = self._positions(start, start + x_BSC.shape[1])
        h_BSC = self.model.trunk(x_BSC, positions_BS2=positions, mask=mask, cache=self.cache)
        self.cache.end()
        return h_BSC[:, -1]

    def start(self) -> Tensor:
        """Prefill the prefix; returns ``[B, C]``, the state that predicts ``x_0``."""
        if self.forward_passes:
            raise RuntimeError("the decoder has already started")
        values_BP = torch.full(self.prefix_BPC.shape[:2], -1, dtype=torch.long, device=self.prefix_BPC.device)
        return self._run(self.prefix_BPC, values_BP)

    def feed(self, tokens_B: Tensor) -> Tensor:
        """Append ``x_t`` (``[B]`` codes); returns ``[B, C]``, the state that predicts ``x_{t+1}``."""
        if not self.forward_passes:
            raise RuntimeError("call start() before feed()")
        if len(self.values) >= self.model.config.num_positions - 1:
            raise RuntimeError(f"all {self.model.config.num_positions} positions are already decoded")
        tokens_B = tokens_B.to(self.prefix_BPC.device).long()
        self.values.append(tokens_B)
        return self._run(self.model.codes.embed(tokens_B)[:, None], tokens_B[:, None])
