"""Flax NNX models: FLUX transformer, autoencoder, text encoders, reward models."""
