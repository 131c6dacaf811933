"""BERT discriminator: `transformers.BertForPreTraining` (NSP = real/generated, MLM = masked values)."""

from __future__ import annotations

from torch import Tensor, nn
from transformers import BertConfig, BertForPreTraining

from ganbert.models.sequence import Sequence, Vocabulary, straight_through_embed


def bert_config(vocab: Vocabulary, hidden: int = 768, layers: int = 12, heads: int = 12, intermediate: int = 3072,
                max_positions: int = 1032, dropout: float = 0.1) -> BertConfig:
    """The in-memory `BertConfig` (never downloaded) over `vocab`'s tokens; the defaults are BERT-base's sizes.

    Raises ValueError naming the argument: sizes must be >= 1, `heads` must divide `hidden`, `dropout` in [0, 1).
    """
    for name, value in (("hidden", hidden), ("layers", layers), ("heads", heads), ("intermediate", intermediate),
                        ("max_positions", max_positions)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if hidden % heads:
        raise ValueError(f"heads must divide hidden={hidden}, got {heads}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return BertConfig(vocab_size=vocab.size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=intermediate, max_position_embeddings=max_positions, type_vocab_size=2,
                      pad_token_id=vocab.pad, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                      attn_implementation="sdpa")


class BertDiscriminator(nn.Module):
    """NSP logits `(B, 2)` (0 = real "is next", 1 = generated) and MLM logits at masked positions `(N, V)`.

    `vocab` is the token space of the sequences it judges; the sizes are `bert_config`'s; `checkpointing`
    recomputes each layer's activations in the backward pass (less memory, same gradients).
    """

    def __init__(self, vocab: Vocabulary, *, hidden: int = 768, layers: int = 12, heads: int = 12,
                 intermediate: int = 3072, max_positions: int = 1032, dropout: float = 0.1,
                 checkpointing: bool = False) -> None:
        super().__init__()
        self.vocab = vocab
        self.model = BertForPreTraining(bert_config(vocab, hidden, layers, heads, intermediate, max_positions,
                                                    dropout))
        if checkpointing:
            self.model.activation_checkpointing_enable({"use_reentrant": False})

    def forward(self, seq: Sequence, masked: Tensor) -> tuple[Tensor, Tensor]:
        """`seq` of `(B, S)` tensors and bool `masked` `(B, S)` -> (NSP logits (B, 2), MLM logits (N, V))."""
        weight = self.model.bert.embeddings.word_embeddings.weight
        embeds = straight_through_embed(weight, self.vocab, seq)
        hidden, pooled = self.model.bert(inputs_embeds=embeds, token_type_ids=seq.token_types)[:2]
        nsp = self.model.cls.seq_relationship(pooled)
        mlm = self.model.cls.predictions(hidden[masked])
        return nsp, mlm
