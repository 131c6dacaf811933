"""Summarising, quantising (paper and monotonic), vocabulary, sequences, masking, ST embedding."""

import pytest
import torch

from ganbert.config import SequenceConfig
from ganbert.models.sequence import (
    IGNORE_INDEX,
    SPECIALS,
    Vocabulary,
    build_sequence,
    mask_positions,
    mask_sequence,
    quantise,
    straight_through_embed,
    summarise,
    value_ids,
)

PAPER = {"scheme": "paper"}


def test_summarise_is_signed_abs_max_per_block() -> None:
    x = torch.zeros(1, 1, 16, 16, 16)
    x[0, 0, 1, 2, 3] = -7.0   # block (0,0,0) of a 2x2x2 grid: negative wins by |x|
    x[0, 0, 0, 0, 0] = 5.0
    x[0, 0, 12, 12, 12] = 3.0  # block (1,1,1)
    s = summarise(x, 8)
    assert s.shape == (1, 8)
    assert s[0, 0] == -7.0 and s[0, 7] == 3.0 and s[0, 1] == 0.0


def test_summarise_frames_share_the_length_in_order() -> None:
    vol = torch.randn(2, 2, 24, 20, 20)
    s = summarise(vol, 512)
    assert s.shape == (2, 512)
    assert torch.equal(s[:, :256], summarise(vol[:, :1], 256))
    assert torch.equal(s[:, 256:], summarise(vol[:, 1:], 256))


def test_summarise_gradient_reaches_the_selected_voxels() -> None:
    vol = torch.randn(1, 1, 8, 8, 8, requires_grad=True)
    summarise(vol, 8).sum().backward()
    assert int((vol.grad != 0).sum()) == 8


@pytest.mark.parametrize("bad, match", [((torch.zeros(1, 3, 8, 8, 8), 8), "divisible"),
                                        ((torch.zeros(1, 8, 8, 8), 8), "B, C, D, H, W"),
                                        ((torch.zeros(1, 1, 4, 4, 4), 512), "smaller")])
def test_summarise_rejects_bad_input(bad: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        summarise(*bad)


def test_paper_scheme_exact_mapping() -> None:
    v = torch.tensor([-0.0007, -0.5, -0.501, 0.0, 0.0004, 0.001, 0.0015, 9.999, 10.0, 10.5, 10.7, 23.456])
    # q =            -1,      -500,  -501,   0,   0,      1,     2,      9999,  10000, 10500, 10700, 23456
    expected = [1, 0, 1, 0, 0, 1, 2, 9999, 500, 500, 700, 956]
    assert quantise(v, 1000.0, "paper").tolist() == expected


def test_paper_scheme_boundaries_and_range() -> None:
    q = torch.tensor([0, 1, 9999, 10000, -1, -499, -500, 10499, 10500])
    assert value_ids(q, "paper").tolist() == [0, 1, 9999, 500, 1, 499, 0, 999, 500]
    ids = quantise(torch.linspace(-200, 300, 100_001), 1000.0, "paper")
    assert int(ids.min()) >= 0 and int(ids.max()) < 10_000


def test_scale_is_configurable() -> None:
    assert quantise(torch.tensor([1.234]), 100.0, "paper").item() == 123
    assert quantise(torch.tensor([1.234]), 10_000.0, "paper").item() == (12340 % 500) + 500


def test_monotonic_scheme_preserves_order() -> None:
    v = torch.sort(torch.randn(5000) * 3).values
    ids = quantise(v, 1000.0, "monotonic")
    assert bool((ids[1:] >= ids[:-1]).all())
    assert ids.min() >= 0
    assert quantise(torch.tensor([-100.0, 100.0]), 1000.0, "monotonic", low=-5.0).tolist() == [0, 9999]


def test_monotonic_maps_each_calibrated_range_onto_all_value_ids() -> None:
    vocab = Vocabulary(SequenceConfig(mri_range=(-2.0, 3.0), pet_range=(0.0, 200.0)))
    mri, x = vocab.encode(torch.tensor([[-2.0, 0.5, 3.0, 99.0]]), "mri")
    assert mri.tolist() == [[5, 5 + 5000, 5 + 9999, 5 + 9999]]   # specials first, then ids 0..V-1, clipped
    assert torch.allclose(x, torch.tensor([[0.0, 4999.5, 9999.0, 101 * 9999 / 5]]))
    pet, _ = vocab.encode(torch.tensor([[0.0, 100.0, 200.0]]), "pet")
    assert pet.tolist() == [[5, 5 + 5000, 5 + 9999]]   # the PET segment has its own range


def test_uncalibrated_monotonic_vocabulary_names_the_field() -> None:
    with pytest.raises(ValueError, match="sequence.mri_range"):
        Vocabulary(SequenceConfig())
    Vocabulary(SequenceConfig(**PAPER))  # the paper scheme needs no calibration


def test_token_health_counts_collisions_clips_and_distinct_ids() -> None:
    v = torch.tensor([-0.5, 0.0005, 0.002, 0.002, 12.0])   # paper q: -500, 0, 2, 2, 12000 -> ids 0, 0, 2, 2, 500
    paper = Vocabulary(SequenceConfig(**PAPER))
    assert paper.health(v, "pet") == pytest.approx({"collide_or_clip": 0.6, "distinct": 3.0})
    mono = Vocabulary(SequenceConfig(mri_range=(0.0, 1.0), pet_range=(0.0, 1.0)))
    health = mono.health(torch.tensor([-0.1, 0.0, 0.5, 1.0, 1.2]), "mri")
    assert health == pytest.approx({"collide_or_clip": 0.4, "distinct": 3.0})


@pytest.mark.parametrize("scheme", ["paper", "monotonic"])
def test_specials_never_collide_with_values(scheme: str) -> None:
    vocab = Vocabulary(SequenceConfig(scheme=scheme, mri_range=(-1.0, 1.0), pet_range=(-1.0, 1.0)))
    specials = {vocab.special(name) for name in SPECIALS}
    assert len(specials) == len(SPECIALS)
    tokens, _ = vocab.encode(torch.linspace(-500, 500, 200_001), "pet")
    assert not specials & set(tokens.unique().tolist())
    assert int(tokens.max()) < vocab.size and max(specials) < vocab.size
    assert vocab.size == vocab.n_values + len(SPECIALS)


def test_build_sequence_layout_and_token_types() -> None:
    vocab = Vocabulary(SequenceConfig(length=8, **PAPER))
    seq = build_sequence(vocab, torch.full((2, 8), 0.002), torch.full((2, 8), 0.003))
    t = seq.tokens[0].tolist()
    assert len(t) == 19 and t[0] == vocab.cls and t[9] == vocab.sep and t[18] == vocab.sep
    assert t[1:9] == [2] * 8 and t[10:18] == [3] * 8
    assert seq.token_types[0].tolist() == [0] * 10 + [1] * 9
    assert seq.value_mask[0].sum() == 16


def test_mask_positions_counts_and_segments() -> None:
    pos = mask_positions(4, 512, 0.05, 0.25)
    assert pos.shape == (4, 1027)
    assert (pos[:, 1:513].sum(1) == round(0.05 * 512)).all()
    assert (pos[:, 514:1026].sum(1) == round(0.25 * 512)).all()
    assert not pos[:, [0, 513, 1026]].any()
    with pytest.raises(ValueError, match="pet_ratio"):
        mask_positions(1, 8, 0.1, 1.0)


def test_mask_sequence_labels_are_the_real_tokens() -> None:
    vocab = Vocabulary(SequenceConfig(length=8, **PAPER))
    real = build_sequence(vocab, torch.rand(1, 8), torch.rand(1, 8) + 1)
    fake = build_sequence(vocab, torch.rand(1, 8), torch.rand(1, 8))
    pos = mask_positions(1, 8, 0.25, 0.5)
    masked, labels = mask_sequence(vocab, fake, pos, labels_from=real)
    assert (masked.tokens[pos] == vocab.mask).all()
    assert torch.equal(labels[pos], real.tokens[pos])
    assert (labels[~pos] == IGNORE_INDEX).all()
    assert not masked.value_mask[pos].any()


def test_straight_through_forward_exact_backward_is_the_neighbour_slope() -> None:
    vocab = Vocabulary(SequenceConfig(length=8, **PAPER))
    weight = torch.randn(vocab.size, 4)
    pet = torch.full((1, 8), 0.0123, requires_grad=True)   # q = 12
    seq = build_sequence(vocab, torch.zeros(1, 8), pet)
    emb = straight_through_embed(weight, vocab, seq)
    assert torch.equal(emb, weight[seq.tokens])
    direction = torch.randn(4)
    (emb[0, 10] * direction).sum().backward()
    slope = (weight[13] - weight[11]) / 2
    expected = 1000.0 * (slope * direction).sum()   # d(s*v)/dv = s
    assert torch.allclose(pet.grad[0, 0], expected, rtol=1e-5)
    assert pet.grad[0, 1:].abs().sum() == 0
