"""The conversion engine: HF safetensors to MaxText and back, whole or as one process's share."""
