"""Every setting of every command, without torch, typed by dataclass fields that carry their
flag, help, default and roles (`fields`): the trainer's settings tree (`tree`: model, schedule,
data, checkpoints, parallel layout, launch), the Lighthouse launch settings derived from
LighthouseConfig and RecipeSchedule (`lighthouse`, with the table of supported settings,
`rules`; re-exported by `lighthouse_megatron.megatron`) and a Slurm job's (`slurm`). From the
fields come the parsers (`train`; `convert` and `bench` have small parsers of their own), the
typing of YAML values, the checks (`checks`), Megatron-LM's command line and the sets that
checkpoints and Slurm chains compare. Also here: the one parallel-layout check (`layout`), the
one YAML settings reader (`yaml_file`) and the one output-location check (`files`).

Nothing here imports torch or megatron-core: `lighthouse-megatron CMD --help` imports these
modules only (tests/test_cli.py checks it), and the packages that run the commands import
them, never the other way round.
"""
