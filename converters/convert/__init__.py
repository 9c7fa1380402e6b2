"""The conversions: HF safetensors to MaxText and back, whole or as one process's share.

to_maxtext     hf_to_maxtext: HF -> MaxText (Orbax)
to_hf          maxtext_to_hf: MaxText -> HF, and the plan a stored checkpoint has (choose_plan, export_tensors)
hf_source      an HF folder's config and tensors as a family's rules name them
dropped_rows   HF vocabulary rows MaxText cannot hold, kept beside the checkpoint for the way back
shares         one conversion split over N processes: who does what, staging, records, finalize's checks
common         dtypes, the result, buffer release
"""

from converters.convert.common import DTYPES, Result
from converters.convert.dropped_rows import DROPPED_ROWS, load_dropped_rows
from converters.convert.hf_source import hf_source, load_hf_config, validate_hf_source, with_aliases
from converters.convert.to_hf import DEFAULT_SHARD_BYTES, choose_plan, export_tensors, maxtext_to_hf
from converters.convert.to_maxtext import hf_to_maxtext

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "DROPPED_ROWS",
    "DTYPES",
    "Result",
    "choose_plan",
    "export_tensors",
    "hf_source",
    "hf_to_maxtext",
    "load_dropped_rows",
    "load_hf_config",
    "maxtext_to_hf",
    "validate_hf_source",
    "with_aliases",
]
