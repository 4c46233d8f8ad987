"""The model block of the tiny PXD GAN that the end-to-end training tests (Ray jobs, node
loss, storage preflight, faults) train: small enough for a few steps in seconds on one core."""

TINY_GAN_MODEL = """\
model:
  family: gan
  z_dim: 8
  sensor_noise_dim: 2
  embed_dim: 16
  attention_layers: 1
  attention_heads: 2
  decoder_channels: [8, 4]
  discriminator_channels: [4, 8]
"""
