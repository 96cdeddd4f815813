"""The repository's evidence studies (not part of the wheel): `python -m benchmarks.<study>`
from the repository root, e.g. `python -m benchmarks.quality --preset tiny --out /tmp/q`.

They use `lighthouse_megatron` as any user would; the package never imports them."""
