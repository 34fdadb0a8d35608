"""ordered-vqvae: anytime sampling of autoregressive models via ordered autoencoding."""
