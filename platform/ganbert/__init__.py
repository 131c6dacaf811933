"""GANBERT: MRI->PET synthesis with a 3D U-Net generator and a BERT discriminator."""
