"""The flags and settings checks of every command that runs torch (`train`, `convert`,
`inspect`, `bench`), and the Lighthouse launch flags with their table of supported settings
(`lighthouse`, `rules`; re-exported by `lighthouse_megatron.megatron`).

Nothing here imports torch or megatron-core: `lighthouse-megatron CMD --help` imports these
modules only (tests/test_cli.py checks it), and the packages that run the commands import
them, never the other way round.
"""
