"""Generator, BERT discriminator, CNN-D and the method registry at tiny and paper sizes."""

import pytest
import torch

from ganbert import config
from ganbert.models import METHODS, build_generator, build_networks
from ganbert.models.bert_disc import BertDiscriminator, bert_config
from ganbert.models.unet3d import UNet3D
from ganbert.sequence import Vocabulary, build_sequence, mask_positions, mask_sequence


def test_registry_holds_the_four_methods_of_table_1() -> None:
    assert set(METHODS) == set(config.METHODS)
    assert METHODS["pix2pix-tanh"].head == "tanh" and not METHODS["pix2pix-tanh"].bert
    assert METHODS["ganbert"].bert and not METHODS["ganbert"].cnn
    assert METHODS["ganbert-cnnd"].bert and METHODS["ganbert-cnnd"].cnn


@pytest.mark.parametrize("method", list(METHODS))
def test_tiny_networks_forward(method: str) -> None:
    cfg = config.apply(config.tiny(), {"model.method": method})
    nets = build_networks(cfg)
    fake = nets.generator(torch.randn(2, 1, 32, 32, 32))
    assert fake.shape == (2, 2, 14, 12, 12)
    assert (nets.bert is not None) == METHODS[method].bert and (nets.cnn is not None) == METHODS[method].cnn
    if nets.cnn is not None:
        assert nets.cnn(torch.randn(2, 1, 32, 32, 32), fake).shape[:2] == (2, 1)


def test_heads_differ() -> None:
    torch.manual_seed(0)
    tanh = build_generator(config.apply(config.tiny(), {"model.method": "pix2pix-tanh"}))
    out = tanh(torch.randn(1, 1, 32, 32, 32) * 50)
    assert out.abs().max() <= 1.0


def test_paper_generator_shape_on_meta_device() -> None:
    cfg = config.paper()
    with torch.device("meta"):
        g = build_generator(cfg)
        out = g(torch.empty(2, 1, 256, 256, 256))
    assert out.shape == (2, 2, 93, 76, 76)


def test_paper_bert_is_bert_base_with_1027_tokens() -> None:
    cfg = config.paper()
    bc = bert_config(cfg)
    assert (bc.num_hidden_layers, bc.hidden_size, bc.num_attention_heads) == (12, 768, 12)
    assert bc.max_position_embeddings >= 1027 and bc.vocab_size == 10_005
    with torch.device("meta"):
        d = BertDiscriminator(cfg)
    n = sum(p.numel() for p in d.parameters())
    # bert-base-uncased has 110.1M with 30,522 tokens and 512 positions; with 10,005 tokens and 1,032
    # positions it is 110.1M - (30522 - 10005) * 768 (+ MLM bias) + 520 * 768 = 94.73M.
    assert n == 94_728_215, n
    vocab = Vocabulary(cfg.sequence)
    seq = build_sequence(vocab, torch.randn(1, 512), torch.randn(1, 512))
    assert seq.tokens.shape == (1, 1027)


def test_bert_discriminator_outputs() -> None:
    cfg = config.tiny()
    d = BertDiscriminator(cfg)
    vocab = Vocabulary(cfg.sequence)
    seq = build_sequence(vocab, torch.randn(3, 64), torch.randn(3, 64))
    pos = mask_positions(3, 64, 0.05, 0.25)
    masked, labels = mask_sequence(vocab, seq, pos)
    nsp, mlm = d(masked, pos)
    assert nsp.shape == (3, 2) and mlm.shape == (int(pos.sum()), vocab.size)
    assert d.model.config._attn_implementation == "sdpa"


def test_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = UNet3D(32, (14, 12, 12), 2, 64, 4, 16, "tanhshrink", checkpointing=False)
    ckpt = UNet3D(32, (14, 12, 12), 2, 64, 4, 16, "tanhshrink", checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_generator_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mri_size"):
        UNet3D(48, (14, 12, 12), 2, 64)
    with pytest.raises(ValueError, match="head"):
        UNet3D(32, (14, 12, 12), 2, 64, head="relu")
    with pytest.raises(ValueError, match="mri"):
        UNet3D(32, (14, 12, 12), 2, 64)(torch.randn(1, 2, 32, 32, 32))


def test_bert_checkpointing_gives_the_same_gradients() -> None:
    cfgs = [config.apply(config.tiny(), {"optim.checkpointing": flag}) for flag in (False, True)]
    torch.manual_seed(0)
    plain = BertDiscriminator(cfgs[0])
    ckpt = BertDiscriminator(cfgs[1])
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


@pytest.mark.parametrize("method, mean, std", [("ganbert", 39.7, 40.0), ("ganbert", -0.4, 0.5),
                                               ("pix2pix-tanh", 0.3, 2.0)])
def test_init_output_starts_the_generator_at_the_mean_with_the_data_gain(method: str, mean: float,
                                                                         std: float) -> None:
    g = build_generator(config.apply(config.tiny(), {"model.method": method}))
    torch.nn.init.zeros_(g.out.weight)
    g.init_output(mean, std)
    out = g(torch.randn(1, 1, 32, 32, 32))
    assert torch.allclose(out, torch.full_like(out, mean), atol=1e-4)
    assert float(g.out_scale) == max(std, 1.0) and "out_scale" in g.state_dict()
    with pytest.raises(ValueError, match="std"):
        g.init_output(mean, 0.0)
