"""Data: the mmap indexed format, GPT samples, blending, streaming from raw shards,
preprocessing and built-in corpora. The training setup calls ``datasets.build_datasets`` (or
``datasets.build_streaming_datasets``) and serves batches with ``loader.micro_batches``."""
