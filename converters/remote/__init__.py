"""Remote storage: the Hugging Face hub, GCS, downloading sources and publishing outputs."""
