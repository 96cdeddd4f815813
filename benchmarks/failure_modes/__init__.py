"""Where Lighthouse attention is weak, measured: short sequences, peak memory, k up to its largest
value, QK layer-norm, within-tile causality (`python -m benchmarks.failure_modes.run`). See README.md."""
