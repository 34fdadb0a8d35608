"""XLA options the project asks for, by an explicit call: importing the library changes
nothing in the process."""

import os

VECTOR_WIDTH = "--xla_cpu_prefer_vector_width"


def prefer_wide_vectors() -> None:
    """Asks XLA's CPU code generator for 512-bit vectors (its default is 256) unless
    XLA_FLAGS already names a vector width. CPUs without AVX-512 use their widest vectors
    anyway. XLA reads XLA_FLAGS at its first compilation, so call this before anything
    compiles; the `ovqvae` command and the benches do (docs/performance.md gives the gain)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if VECTOR_WIDTH not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {VECTOR_WIDTH}=512".strip()
