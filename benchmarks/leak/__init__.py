"""The leak probe: does a model trained with Lighthouse attention use the within-tile look-ahead of
its selection? `run.py` probes a Lighthouse-trained and a dense-trained checkpoint
(`python -m benchmarks.leak.run`). See README.md."""
