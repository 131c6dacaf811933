"""Networks and the registry of the four methods of the paper's Table 1 (SPEC section 7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ganbert.config import METHODS, Config
from ganbert.models.cnn_disc import PatchGAN3D
from ganbert.models.sequence import Vocabulary
from ganbert.models.unet3d import UNet3D

if TYPE_CHECKING:
    from ganbert.models.bert_disc import BertDiscriminator


@dataclass
class Networks:
    """The networks of one method; a discriminator the method does not use is None."""

    generator: nn.Module
    bert: nn.Module | None
    cnn: nn.Module | None

    def named(self) -> dict[str, nn.Module]:
        named = (("generator", self.generator), ("bert", self.bert), ("cnn", self.cnn))
        return {k: v for k, v in named if v is not None}


def pet_fov_ratio(cfg: Config) -> tuple[float, float, float]:
    """PET field of view over the MRI's, per axis (both centred on the conformed T1's centre)."""
    g = cfg.geometry
    return tuple(min(1.0, f / g.mri_fov_mm) for f in g.pet_fov_mm)  # type: ignore[return-value]


def build_generator(cfg: Config) -> UNet3D:
    """The U-Net generator of the config's geometry, sequence length, model sizes and method head."""
    g, m = cfg.geometry, cfg.model
    return UNet3D(mri_size=g.mri_size[0], pet_size=g.pet_size, frames=g.pet_frames, length=cfg.sequence.length,
                  base_channels=m.base_channels, max_channels=m.max_channels, head=METHODS[m.method].head,
                  checkpointing=cfg.optim.checkpointing, pet_fov_ratio=pet_fov_ratio(cfg))


def build_bert(cfg: Config) -> BertDiscriminator:
    """The BERT discriminator of the config's model sizes over its token space (BERT-base at the paper preset).

    Its module (and so `transformers`, about 2 s to import) is loaded here, by training, never by inference.
    """
    from ganbert.models.bert_disc import BertDiscriminator

    m = cfg.model
    return BertDiscriminator(Vocabulary(cfg.sequence), hidden=m.bert_hidden, layers=m.bert_layers, heads=m.bert_heads,
                             intermediate=m.bert_intermediate, max_positions=m.bert_max_positions,
                             checkpointing=cfg.optim.checkpointing)


def build_networks(cfg: Config) -> Networks:
    """Build the generator and the method's discriminators from the config (nothing is downloaded).

    A discriminator whose every generator weight is 0 (e.g. the L1-only U-Net: ganbert with lambda_nsp =
    lambda_mlm = 0) is not built: it could not change the generator, and training it would only cost time.
    """
    method, o = METHODS[cfg.model.method], cfg.optim
    use_bert = method.bert and (o.lambda_nsp > 0 or o.lambda_mlm > 0)
    use_cnn = method.cnn and o.lambda_cnn > 0
    return Networks(
        generator=build_generator(cfg),
        bert=build_bert(cfg) if use_bert else None,
        cnn=(PatchGAN3D(frames=cfg.geometry.pet_frames, channels=cfg.model.cnn_channels, layers=cfg.model.cnn_layers,
                        pet_fov_ratio=pet_fov_ratio(cfg)) if use_cnn else None),
    )
