"""Images to BERT sequences: signed abs-max summaries, quantisation, vocabulary, masking, ST embedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ganbert.config import SequenceConfig, grid_for

SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")
IGNORE_INDEX = -100


# --- summarising -------------------------------------------------------------------------------

def summarise(volume: Tensor, length: int = 512) -> Tensor:
    """Signed absolute-max pooling of `(B, C, D, H, W)` to `(B, length)`.

    Each of the C frames is pooled to `length // C` sub-volumes on the grid `grid_for(length // C)`
    (adaptive pooling); each value is the voxel with the largest |x| in its sub-volume, sign kept.
    Frames are concatenated in order. Differentiable (gradients reach the selected voxels).
    """
    if volume.ndim != 5:
        raise ValueError(f"volume must be (B, C, D, H, W), got shape {tuple(volume.shape)}")
    b, c = volume.shape[:2]
    if length % c:
        raise ValueError(f"length={length} is not divisible by the {c} frames of volume")
    grid = grid_for(length // c)
    if any(n > s for n, s in zip(grid, volume.shape[2:])):
        raise ValueError(f"volume {tuple(volume.shape[2:])} is smaller than the summary grid {grid}")
    _, index = F.adaptive_max_pool3d(volume.detach().abs().float(), grid, return_indices=True)
    values = volume.flatten(2).gather(2, index.flatten(2))  # (B, C, length // C)
    return values.reshape(b, length)


# --- quantising --------------------------------------------------------------------------------

SEGMENTS = ("mri", "pet")


def scaled(values: Tensor, scale: float = 1000.0, low: float = 0.0) -> Tensor:
    """The continuous value x = scale * (v - low) whose rounding is the integer q of SPEC section 3."""
    return (values.float() - low) * scale


def value_ids(q: Tensor, scheme: str = "paper", *, vocab_values: int = 10_000, wrap: int = 500) -> Tensor:
    """Integer q (any shape) -> value ids in [0, vocab_values), before special-token handling.

    paper: 1 <= q < V -> q; q <= 0 -> (-q) mod wrap; q >= V -> (q mod wrap) + wrap (ids collide on purpose).
    monotonic: clip(q, 0, V - 1): collision-free and order-preserving inside the calibrated range.
    """
    q = q.long()
    if scheme == "paper":
        ids = torch.where(q <= 0, (-q) % wrap, q)
        return torch.where(q >= vocab_values, q % wrap + wrap, ids)
    if scheme == "monotonic":
        return q.clamp(0, vocab_values - 1)
    raise ValueError(f"scheme must be 'paper' or 'monotonic', got {scheme!r}")


def quantise(values: Tensor, scale: float = 1000.0, scheme: str = "paper", low: float = 0.0, **kwargs: int) -> Tensor:
    """Float values (any shape) -> LongTensor value ids of SPEC section 3: q = round(scale * (v - low))."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return value_ids(torch.round(scaled(values, scale, low)), scheme, **kwargs)


@dataclass(frozen=True)
class Vocabulary:
    """Token ids: value ids plus [PAD] [CLS] [SEP] [MASK] [UNK] that no value maps to.

    paper: q = round(scale * v) for both segments; token = value id (0 .. V-1, so token q is value q),
    specials follow at V .. V+4.
    monotonic (default): each segment has its calibrated range [lo, hi] (`sequence.mri_range`,
    `sequence.pet_range`) mapped linearly onto q in 0 .. V-1 and clipped; specials first at 0 .. 4, then
    token = value id + 5 (order of tokens = order of values within a segment; token types tell them apart).
    """

    cfg: SequenceConfig

    def __post_init__(self) -> None:
        if self.cfg.scheme == "monotonic":
            for seg in SEGMENTS:
                lo, hi = getattr(self.cfg, f"{seg}_range")
                if not hi > lo:
                    raise ValueError(f"sequence.{seg}_range={(lo, hi)} is not calibrated: the monotonic scheme "
                                     "needs the summary-value range of the training data (recorded by "
                                     "`ganbert preprocess` in manifest.json; `ganbert train` fills it in)")

    @property
    def n_values(self) -> int:
        return self.cfg.vocab_values

    @property
    def value_offset(self) -> int:
        return 0 if self.cfg.scheme == "paper" else len(SPECIALS)

    @property
    def size(self) -> int:
        return self.n_values + len(SPECIALS)

    def special(self, name: str) -> int:
        base = self.n_values if self.cfg.scheme == "paper" else 0
        return base + SPECIALS.index(name)

    @property
    def pad(self) -> int:
        return self.special("[PAD]")

    @property
    def cls(self) -> int:
        return self.special("[CLS]")

    @property
    def sep(self) -> int:
        return self.special("[SEP]")

    @property
    def mask(self) -> int:
        return self.special("[MASK]")

    def affine(self, segment: str) -> tuple[float, float]:
        """(scale, low) of a segment: x = scale * (v - low), q = round(x)."""
        if segment not in SEGMENTS:
            raise ValueError(f"segment must be one of {SEGMENTS}, got {segment!r}")
        if self.cfg.scheme == "paper":
            return self.cfg.scale, 0.0
        lo, hi = getattr(self.cfg, f"{segment}_range")
        return (self.n_values - 1) / (hi - lo), lo

    def tokens_from_q(self, q: Tensor) -> Tensor:
        """Integer q (any shape) -> token ids."""
        ids = value_ids(q, self.cfg.scheme, vocab_values=self.cfg.vocab_values, wrap=self.cfg.wrap)
        return ids + self.value_offset

    def encode(self, values: Tensor, segment: str) -> tuple[Tensor, Tensor]:
        """Summary values (B, L) of a segment -> (token ids (B, L), continuous x (B, L) carrying gradients)."""
        x = scaled(values, *self.affine(segment))
        return self.tokens_from_q(torch.round(x.detach())), x

    def health(self, values: Tensor, segment: str) -> dict[str, float]:
        """Token health of real summary values (any shape): share that collide or clip, and distinct ids used.

        collide_or_clip: paper scheme, q <= 0 or q >= V (ids shared through the wrap); monotonic, q outside
        0 .. V-1 (clipped to the end ids). distinct: number of distinct value ids the values use.
        """
        q = torch.round(scaled(values, *self.affine(segment)))
        bad = (q < 0) | (q > self.n_values - 1) if self.cfg.scheme == "monotonic" else (q <= 0) | (q >= self.n_values)
        ids = self.tokens_from_q(q)
        return {"collide_or_clip": float(bad.float().mean()), "distinct": float(ids.unique().numel())}


# --- sequences and masking ---------------------------------------------------------------------

@dataclass
class Sequence:
    """A batch of `[CLS] mri [SEP] pet [SEP]` sequences, all `(B, 2L + 3)`.

    `continuous` is x = scale * (v - low) at value positions (0 at specials), `value_mask` marks value positions whose
    embedding receives the straight-through gradient.
    """

    tokens: Tensor
    continuous: Tensor
    token_types: Tensor
    value_mask: Tensor


def build_sequence(vocab: Vocabulary, mri_values: Tensor, pet_values: Tensor) -> Sequence:
    """MRI and PET summaries `(B, L)` -> `[CLS] mri_1..mri_L [SEP] pet_1..pet_L [SEP]` of `(B, 2L+3)`.

    token_type 0 covers [CLS], the MRI segment and its [SEP]; 1 covers the PET segment and the last [SEP].
    """
    if mri_values.shape != pet_values.shape or mri_values.ndim != 2:
        raise ValueError(f"mri_values and pet_values must both be (B, L), got {tuple(mri_values.shape)} "
                         f"and {tuple(pet_values.shape)}")
    b, length = mri_values.shape
    device = mri_values.device
    mri_tok, mri_x = vocab.encode(mri_values, "mri")
    pet_tok, pet_x = vocab.encode(pet_values, "pet")

    def special(token: int) -> Tensor:
        return torch.full((b, 1), token, dtype=torch.long, device=device)

    zero = torch.zeros(b, 1, device=device, dtype=mri_x.dtype)
    tokens = torch.cat([special(vocab.cls), mri_tok, special(vocab.sep), pet_tok, special(vocab.sep)], 1)
    continuous = torch.cat([zero, mri_x, zero, pet_x, zero], 1)
    token_types = torch.cat([torch.zeros(b, length + 2, dtype=torch.long, device=device),
                             torch.ones(b, length + 1, dtype=torch.long, device=device)], 1)
    value_mask = tokens.new_ones(tokens.shape, dtype=torch.bool)
    value_mask[:, [0, length + 1, 2 * length + 2]] = False
    return Sequence(tokens, continuous, token_types, value_mask)


def mask_positions(batch: int, length: int, mri_ratio: float, pet_ratio: float,
                   generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Bool `(batch, 2L+3)`: exactly round(ratio*L) random MRI and PET value positions per sample."""
    for name, ratio in (("mri_ratio", mri_ratio), ("pet_ratio", pet_ratio)):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {ratio}")
    out = torch.zeros(batch, 2 * length + 3, dtype=torch.bool)
    for start, ratio in ((1, mri_ratio), (length + 2, pet_ratio)):
        k = round(ratio * length)
        if k:
            order = torch.rand(batch, length, generator=generator).argsort(1)[:, :k]
            out.scatter_(1, order + start, True)
    return out.to(device)


def mask_sequence(vocab: Vocabulary, seq: Sequence, positions: Tensor, labels_from: Sequence | None = None
                  ) -> tuple[Sequence, Tensor]:
    """Replace `positions` (bool `(B, 2L+3)`) by [MASK]; return the masked sequence and MLM labels.

    Labels are the tokens of `labels_from` (default: `seq` itself; pass the real sequence when masking a
    generated one, so BERT must predict the real PET) at masked positions and -100 elsewhere.
    """
    source = labels_from if labels_from is not None else seq
    labels = torch.where(positions, source.tokens, torch.full_like(source.tokens, IGNORE_INDEX))
    tokens = torch.where(positions, torch.full_like(seq.tokens, vocab.mask), seq.tokens)
    masked = Sequence(tokens, seq.continuous, seq.token_types, seq.value_mask & ~positions)
    return masked, labels


# --- straight-through embedding ------------------------------------------------------------------

def straight_through_embed(weight: Tensor, vocab: Vocabulary, seq: Sequence) -> Tensor:
    """Token embeddings `(B, S, H)` whose forward value is exact and whose gradient w.r.t. x is the slope.

    Forward: `weight[tokens]`. Backward, at value positions: d emb / dx =
    (weight[tok(q+1)] - weight[tok(q-1)]) / 2, the central slope between neighbouring value bins
    (detached, so BERT's embeddings learn only from the tokens they embed). Masked and special positions
    carry no gradient to the values.
    """
    emb = F.embedding(seq.tokens, weight)
    if not seq.continuous.requires_grad:
        return emb
    q = torch.round(seq.continuous.detach())
    slope = (F.embedding(vocab.tokens_from_q(q + 1), weight) - F.embedding(vocab.tokens_from_q(q - 1), weight)) / 2
    delta = (seq.continuous - seq.continuous.detach()) * seq.value_mask.to(seq.continuous.dtype)
    return emb + delta.unsqueeze(-1).to(emb.dtype) * slope.detach()
