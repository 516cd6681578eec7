"""Data: the mmap indexed format, GPT samples, preprocessing and built-in corpora."""
