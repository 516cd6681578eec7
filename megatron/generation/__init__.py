"""Text generation: next-token choice (sampling.py), batched decoding with a key/value cache
(generator.py) and the generate.py worker (run.py)."""
