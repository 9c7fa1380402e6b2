"""ckptflow converter library: streaming Hugging Face (safetensors) <-> MaxText (Orbax) conversion.

Nothing here imports Airflow; heavy libraries (jax, orbax, torch) are imported lazily where needed.
"""

__version__ = "0.1.0"
