"""Reading and writing checkpoint files: safetensors folders, Orbax/tensorstore checkpoints, quantized sources,
direct I/O and its aligned buffers, read-ahead."""
