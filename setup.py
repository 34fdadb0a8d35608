"""ordered-vqvae: anytime sampling of autoregressive models via ordered autoencoding."""

from setuptools import find_packages, setup

setup(
    name="ordered-vqvae",
    version="0.1.0",
    description="Ordered VQ-VAE, a Transformer prior and an anytime sampler (Keras/TensorFlow, Beam)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ordered_vqvae", "ordered_vqvae.*", "pipeline", "pipeline.*"]),
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.3",
        "tensorflow-datasets",
        "tensorflow-probability[tf]",
        "apache-beam[tfrecord]",
        "google-crc32c",
        "absl-py",
        "tensorboard",
        "matplotlib",
        "scikit-learn",
        "pillow",
        "aiohttp",
        "prometheus-client",
        "grpcio",
        "tensorflow-serving-api",
    ],
    extras_require={"test": ["pytest", "hypothesis", "selenium"]},
    entry_points={"console_scripts": ["ovqvae = pipeline.cli:run"]},
)
