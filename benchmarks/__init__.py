"""The repository's evidence studies (not part of the wheel), one package per study with its
README and results/: `python -m benchmarks.<study>.run` from the repository root, e.g.
`python -m benchmarks.failure_modes.run --help`; `python -m benchmarks.report` writes REPORT.md.

They use `lighthouse_megatron` as any user would; the package never imports them."""
