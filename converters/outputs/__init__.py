"""What a conversion writes besides the tensors, and how it writes it, one module each:

lock.py      the destination lock: one writer at a time per output folder
atomic.py    atomic output folders (a hidden temp sibling moved into place whole)
extras.py    the HF side files (config, tokenizer, ...) and copying them
hashing.py   the content hash (BLAKE3), file / array / chunk digests, the background file hasher (a leaf)
manifest.py  the lineage manifest (`ckptflow-manifest.json`) and the output digest
"""
