"""Start-up time of the `lighthouse-megatron` command line (`python -m benchmarks.cli_startup.run`).
See README.md."""
