"""Needle-in-a-haystack retrieval: does the recovered model copy a value from far back as well as
the dense control does? `run.py` probes two trainer checkpoints (`python -m benchmarks.retrieval.run`),
`needle.py` is the sample format (torch-free), `passkey.py` writes training documents in that format.
See README.md."""
