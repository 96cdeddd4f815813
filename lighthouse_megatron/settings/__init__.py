"""The settings of every command, without torch: the trainer's (`train`), the Lighthouse launch
flags with their table of supported settings (`lighthouse`, `rules`; re-exported by
`lighthouse_megatron.megatron`), the flags of `convert`/`inspect` (`convert`) and `bench`
(`bench`), the one parallel-layout check (`layout`), the one YAML settings reader
(`yaml_file`) and the one output-location check (`files`).

Nothing here imports torch or megatron-core: `lighthouse-megatron CMD --help` imports these
modules only (tests/test_cli.py checks it), and the packages that run the commands import
them, never the other way round.
"""
