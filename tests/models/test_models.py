"""Generator, BERT discriminator, CNN-D and the method registry at tiny and paper sizes."""

import pytest
import torch

from ganbert import config
from ganbert.config import METHODS
from ganbert.models import build_bert, build_generator, build_networks
from ganbert.models.bert_disc import BertDiscriminator, bert_config
from ganbert.models.sequence import Vocabulary, build_sequence, mask_positions, mask_sequence
from ganbert.models.unet3d import UNet3D

RANGES = {"sequence.mri_range": (-3.0, 3.0), "sequence.pet_range": (-3.0, 3.0)}


def tiny(**overrides: object) -> config.Config:
    """The tiny preset with a fixed token space (the loop calibrates it from the data)."""
    return config.apply(config.tiny(), RANGES | overrides)


def test_registry_holds_the_four_methods_of_table_1() -> None:
    assert list(METHODS) == ["pix2pix-tanh", "pix2pix-tanhshrink", "ganbert", "ganbert-cnnd"]
    assert METHODS["pix2pix-tanh"].head == "tanh" and not METHODS["pix2pix-tanh"].bert
    assert METHODS["ganbert"].bert and not METHODS["ganbert"].cnn
    assert METHODS["ganbert-cnnd"].bert and METHODS["ganbert-cnnd"].cnn


@pytest.mark.parametrize("method", list(METHODS))
def test_tiny_networks_forward(method: str) -> None:
    cfg = tiny(**{"model.method": method})
    nets = build_networks(cfg)
    fake = nets.generator(torch.randn(2, 1, 32, 32, 32))
    assert fake.shape == (2, 2, 14, 12, 12)
    assert (nets.bert is not None) == METHODS[method].bert and (nets.cnn is not None) == METHODS[method].cnn
    if nets.cnn is not None:
        assert nets.cnn(torch.randn(2, 1, 32, 32, 32), fake).shape[:2] == (2, 1)


def test_heads_differ() -> None:
    torch.manual_seed(0)
    tanh = build_generator(tiny(**{"model.method": "pix2pix-tanh"}))
    out = tanh(torch.randn(1, 1, 32, 32, 32) * 50)
    assert out.abs().max() <= 1.0


def test_paper_generator_shape_on_meta_device() -> None:
    cfg = config.paper()
    with torch.device("meta"):
        g = build_generator(cfg)
        out = g(torch.empty(2, 1, 256, 256, 256))
    assert out.shape == (2, 2, 93, 76, 76)


def test_paper_bert_is_bert_base_with_1027_tokens() -> None:
    cfg = config.apply(config.paper(), RANGES)
    m = cfg.model
    bc = bert_config(Vocabulary(cfg.sequence), m.bert_hidden, m.bert_layers, m.bert_heads, m.bert_intermediate,
                     m.bert_max_positions)
    assert (bc.num_hidden_layers, bc.hidden_size, bc.num_attention_heads) == (12, 768, 12)
    assert bc.max_position_embeddings >= 1027 and bc.vocab_size == 10_005
    with torch.device("meta"):
        d = build_bert(cfg)
    n = sum(p.numel() for p in d.parameters())
    # bert-base-uncased has 110.1M with 30,522 tokens and 512 positions; with 10,005 tokens and 1,032
    # positions it is 110.1M - (30522 - 10005) * 768 (+ MLM bias) + 520 * 768 = 94.73M.
    assert n == 94_728_215, n
    vocab = Vocabulary(cfg.sequence)
    seq = build_sequence(vocab, torch.randn(1, 512), torch.randn(1, 512))
    assert seq.tokens.shape == (1, 1027)


def test_bert_discriminator_outputs() -> None:
    cfg = tiny()
    d = build_bert(cfg)
    vocab = Vocabulary(cfg.sequence)
    seq = build_sequence(vocab, torch.randn(3, 64), torch.randn(3, 64))
    pos = mask_positions(3, 64, 0.05, 0.25)
    masked, labels = mask_sequence(vocab, seq, pos)
    nsp, mlm = d(masked, pos)
    assert nsp.shape == (3, 2) and mlm.shape == (int(pos.sum()), vocab.size)
    assert d.model.config._attn_implementation == "sdpa"


def test_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = UNet3D(mri_size=32, pet_size=(14, 12, 12), frames=2, length=64, base_channels=4, max_channels=16,
                   head="tanhshrink", checkpointing=False)
    ckpt = UNet3D(mri_size=32, pet_size=(14, 12, 12), frames=2, length=64, base_channels=4, max_channels=16,
                  head="tanhshrink", checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_generator_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mri_size"):
        UNet3D(mri_size=48, pet_size=(14, 12, 12), frames=2, length=64)
    with pytest.raises(ValueError, match="head"):
        UNet3D(mri_size=32, pet_size=(14, 12, 12), frames=2, length=64, head="relu")
    with pytest.raises(ValueError, match="mri"):
        UNet3D(mri_size=32, pet_size=(14, 12, 12), frames=2, length=64)(torch.randn(1, 2, 32, 32, 32))


def test_bert_checkpointing_gives_the_same_gradients() -> None:
    cfgs = [tiny(**{"optim.checkpointing": flag}) for flag in (False, True)]
    torch.manual_seed(0)
    plain = build_bert(cfgs[0])
    ckpt = build_bert(cfgs[1])
    ckpt.load_state_dict(plain.state_dict())
    plain.train(), ckpt.train()
    vocab = Vocabulary(cfgs[0].sequence)
    seq = build_sequence(vocab, torch.randn(2, 64), torch.randn(2, 64))
    pos = mask_positions(2, 64, 0.05, 0.25)
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same dropout masks
        nsp, mlm = model(seq, pos)
        (nsp.sum() + mlm.logsumexp(1).sum()).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_bert_discriminator_takes_explicit_sizes_and_rejects_bad_ones() -> None:
    vocab = Vocabulary(tiny().sequence)
    d = BertDiscriminator(vocab, hidden=16, layers=1, heads=2, intermediate=32, max_positions=160, dropout=0.0)
    bc = d.model.config
    assert (bc.hidden_size, bc.num_hidden_layers, bc.num_attention_heads, bc.intermediate_size) == (16, 1, 2, 32)
    assert (bc.max_position_embeddings, bc.vocab_size, bc.hidden_dropout_prob) == (160, vocab.size, 0.0)
    for kwargs, name in (({"hidden": 0}, "hidden"), ({"layers": 0}, "layers"), ({"heads": 3}, "heads"),
                         ({"intermediate": 0}, "intermediate"), ({"max_positions": 0}, "max_positions"),
                         ({"dropout": 1.0}, "dropout")):
        with pytest.raises(ValueError, match=name):
            BertDiscriminator(vocab, **({"hidden": 16, "heads": 2} | kwargs))


@pytest.mark.parametrize("method, mean, std", [("ganbert", 39.7, 40.0), ("ganbert", -0.4, 0.5),
                                               ("pix2pix-tanh", 0.3, 2.0)])
def test_init_output_starts_the_generator_at_the_mean_with_the_data_gain(method: str, mean: float,
                                                                         std: float) -> None:
    g = build_generator(tiny(**{"model.method": method}))
    torch.nn.init.zeros_(g.out.weight)
    g.init_output(mean, std)
    out = g(torch.randn(1, 1, 32, 32, 32))
    assert torch.allclose(out, torch.full_like(out, mean), atol=1e-4)
    assert float(g.out_scale) == max(std, 1.0) and "out_scale" in g.state_dict()
    with pytest.raises(ValueError, match="std"):
        g.init_output(mean, 0.0)


def _marker_pet_voxel(geometry: config.GeometryConfig, marker: tuple[int, int, int]) -> tuple[int, ...]:
    """The PET voxel that holds the world position of MRI voxel `marker` (preprocessing's own affines)."""
    import numpy as np

    from ganbert.prep.grid import mri_affine_for, pet_affine

    mri_aff = mri_affine_for(np.diag([1.0, 1.0, 1.0, 1.0]), geometry.mri_size, geometry)
    world = mri_aff @ np.array([*marker, 1.0])
    ijk = np.linalg.inv(pet_affine(mri_aff, geometry)) @ world
    return tuple(int(v) for v in np.round(ijk[:3]))


@pytest.mark.parametrize("marker", [(20, 40, 24), (44, 22, 36), (30, 30, 30)])
def test_skip_path_puts_an_mri_marker_at_its_pet_voxel(marker: tuple[int, int, int]) -> None:
    """A bright voxel at a world position in the MRI peaks at the PET voxel of that position in the level-0 skip."""
    cfg = config.apply(config.demo(), RANGES)
    g = build_generator(cfg)
    stem_conv = g.stem[0]
    torch.nn.init.zeros_(stem_conv.weight)
    stem_conv.weight.data[:, 0, 1, 1, 1] = 1.0   # the stem copies the MRI into every channel
    seen: list[torch.Tensor] = []
    g.ups[-1].register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    mri = torch.zeros(1, 1, *cfg.geometry.mri_size)
    mri[0, 0, marker[0] - 1:marker[0] + 2, marker[1] - 1:marker[1] + 2, marker[2] - 1:marker[2] + 2] = 1.0
    with torch.no_grad():
        g(mri)
    skip = seen[0][0, 0]
    assert tuple(skip.shape) == cfg.geometry.pet_size
    peak = tuple(int(v) for v in torch.nonzero(skip == skip.max())[0])
    assert peak == _marker_pet_voxel(cfg.geometry, marker)


def test_cnn_discriminator_sees_the_mri_over_the_pet_field_of_view() -> None:
    from ganbert.models.unet3d import fov_sample

    cfg = config.apply(config.demo(), RANGES | {"model.method": "pix2pix-tanh"})
    cnn = build_networks(cfg).cnn
    marker = (44, 22, 36)
    mri = torch.zeros(1, 1, *cfg.geometry.mri_size)
    mri[0, 0, marker[0] - 1:marker[0] + 2, marker[1] - 1:marker[1] + 2, marker[2] - 1:marker[2] + 2] = 1.0
    seen: list[torch.Tensor] = []
    cnn.net[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    cnn(mri, torch.zeros(1, 2, *cfg.geometry.pet_size))
    mri_on_pet = seen[0][0, 0]
    peak = tuple(int(v) for v in torch.nonzero(mri_on_pet == mri_on_pet.max())[0])
    assert peak == _marker_pet_voxel(cfg.geometry, marker)
    assert torch.equal(mri_on_pet, fov_sample(mri, cfg.geometry.pet_size, cnn.pet_fov_ratio)[0, 0])


def test_generator_output_is_float32_off_the_bf16_lattice_under_autocast() -> None:
    torch.manual_seed(0)
    g = build_generator(tiny())
    g.init_output(80.0, 40.0)   # PET-like values, where bf16 steps are 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = g(torch.randn(2, 1, 32, 32, 32))
    assert out.dtype == torch.float32
    on_lattice = (out == out.to(torch.bfloat16).float()).float().mean()
    assert on_lattice < 0.2, float(on_lattice)


def test_init_output_with_the_mean_pet_volume_starts_at_that_volume() -> None:
    g = build_generator(tiny())
    torch.nn.init.zeros_(g.out.weight)
    volume = torch.rand(2, 14, 12, 12) * 120 - 5
    g.init_output(volume, 30.0)
    out = g(torch.randn(2, 1, 32, 32, 32))
    assert torch.allclose(out, volume.expand_as(out), atol=1e-3)
    assert "out_offset" in g.state_dict()
    with pytest.raises(ValueError, match="mean"):
        g.init_output(torch.zeros(2, 3, 3, 3), 1.0)


def test_channels_last_placement_converts_the_conv_weights_and_keeps_the_4d_output_offset() -> None:
    """`optim.channels_last` (the paper preset's default): 3D conv weights in channels_last_3d, the generator's
    4-D output offset buffer as it was (`Module.to(memory_format=channels_last_3d)` raised on it), same outputs."""
    from ganbert.models.saved import place_networks

    cfg = tiny(**{"model.method": "ganbert-cnnd", "optim.channels_last": True})
    torch.manual_seed(0)
    nets = build_networks(cfg)
    mri = torch.randn(1, 1, 32, 32, 32)
    expected = nets.generator(mri)
    placed = place_networks(nets, cfg, torch.device("cpu"))
    for module in (placed.generator, placed.cnn):
        convs = [p for p in module.parameters() if p.dim() == 5]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in convs)
    assert placed.generator.out_offset.shape == (2, 14, 12, 12) and placed.generator.out_offset.is_contiguous()
    assert torch.allclose(placed.generator(mri), expected, atol=1e-5)
