"""The Hugging Face side: the real `transformers` model classes in PyTorch on CPU.

Never `trust_remote_code`: only architectures that ship with transformers load. The model runs with
the eager attention implementation (softmax in float32), in float32 or bfloat16 weights/activations.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from converters.errors import CkptflowError

log = logging.getLogger("ckptflow.verify")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def read_config(folder: str | os.PathLike) -> dict:
    p = Path(folder) / "config.json"
    if not p.is_file():
        raise CkptflowError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise CkptflowError(f"{p}: not valid JSON ({e})") from None


def has_tokenizer(folder: str | os.PathLike | None) -> bool:
    return folder is not None and any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(*folders: str | os.PathLike | None):
    """The first tokenizer that loads from `folders` (None when there is none).

    A folder that has tokenizer files but fails to load is reported and skipped.
    """
    for folder in folders:
        if not has_tokenizer(folder):
            continue
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
            log.info("tokenizer: %s (%s)", folder, type(tok).__name__)
            return tok
        except Exception as e:  # tokenizers raise many kinds; fall back to seeded ids
            log.warning("could not load the tokenizer in %s (%s); trying the next source", folder, str(e).splitlines()[0][:200])
    return None


def torch_dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise CkptflowError(f"unknown dtype {name!r} (choose float32 or bfloat16)") from None


class HFModel:
    """A causal LM loaded from a local folder; `logits(ids)` → float32 `[T, V]`."""

    def __init__(self, folder: str | os.PathLike, *, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM

        self.folder = Path(folder)
        self.config = read_config(folder)
        self.dtype = dtype
        torch.set_grad_enabled(False)
        try:  # our own log line reports the load; no per-tensor progress bar on stderr
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                str(folder),
                dtype=torch_dtype(dtype),
                trust_remote_code=False,
                attn_implementation="eager",
            ).eval()
        except CkptflowError:
            raise
        except Exception as e:  # a broken folder: report its first line, not a traceback
            raise CkptflowError(f"cannot load the Hugging Face model in {folder}: {str(e).splitlines()[0][:300]}") from None

    def nonfinite_weights(self) -> dict[str, dict[str, int]]:
        """Parameters holding NaN or Inf, by tensor name, with counts."""
        import torch

        found = {}
        for name, p in self.model.named_parameters():
            nan, inf = int(torch.isnan(p).sum()), int(torch.isinf(p).sum())
            if nan or inf:
                found[name] = {"nan": nan, "inf": inf}
        return found

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def logits(self, token_ids, **inputs) -> np.ndarray:
        """`inputs`: extra model inputs as numpy arrays (a multimodal prompt's `pixel_values`, `token_type_ids`)."""
        import torch

        ids = torch.tensor([list(token_ids)], dtype=torch.long)
        extra = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        if "pixel_values" in extra:
            extra["pixel_values"] = extra["pixel_values"].to(torch_dtype(self.dtype))
        with torch.no_grad():
            out = self.model(input_ids=ids, use_cache=False, **extra).logits[0]
        return out.float().numpy()
