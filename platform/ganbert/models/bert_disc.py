"""BERT discriminator: `transformers.BertForPreTraining` (NSP = real/generated, MLM = masked values)."""

from __future__ import annotations

from torch import Tensor, nn
from transformers import BertConfig, BertForPreTraining

from ganbert.config import Config
from ganbert.sequence import Sequence, Vocabulary, straight_through_embed


def bert_config(cfg: Config) -> BertConfig:
    """The in-memory `BertConfig` (never downloaded); BERT-base at the paper preset."""
    vocab = Vocabulary(cfg.sequence)
    m = cfg.model
    return BertConfig(vocab_size=vocab.size, hidden_size=m.bert_hidden, num_hidden_layers=m.bert_layers,
                      num_attention_heads=m.bert_heads, intermediate_size=m.bert_intermediate,
                      max_position_embeddings=m.bert_max_positions, type_vocab_size=2, pad_token_id=vocab.pad,
                      attn_implementation="sdpa")


class BertDiscriminator(nn.Module):
    """NSP logits `(B, 2)` (0 = real "is next", 1 = generated) and MLM logits at masked positions `(N, V)`."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.vocab = Vocabulary(cfg.sequence)
        self.model = BertForPreTraining(bert_config(cfg))
        if cfg.optim.checkpointing:
            self.model.activation_checkpointing_enable({"use_reentrant": False})

    def forward(self, seq: Sequence, masked: Tensor) -> tuple[Tensor, Tensor]:
        """`seq` of `(B, S)` tensors and bool `masked` `(B, S)` -> (NSP logits (B, 2), MLM logits (N, V))."""
        weight = self.model.bert.embeddings.word_embeddings.weight
        embeds = straight_through_embed(weight, self.vocab, seq)
        hidden, pooled = self.model.bert(inputs_embeds=embeds, token_type_ids=seq.token_types)[:2]
        nsp = self.model.cls.seq_relationship(pooled)
        mlm = self.model.cls.predictions(hidden[masked])
        return nsp, mlm
