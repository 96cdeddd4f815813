"""The trainer from Python: a tiny model on megatron-core's mock data, checkpoints in runs/api.
Run it as a script (`python examples/train_api.py`); docs/training.md shows the same code."""

from lighthouse_megatron import training

args = training.parse_args(["--mock-data", "--num-layers", "2", "--hidden-size", "64", "--seq-length", "128",
                            "--train-iters", "4", "--save-interval", "2", "--save", "runs/api"])
result = training.run(args)  # TrainResult; no `if __name__ == "__main__":` guard needed
print(result.checkpoints)    # ['runs/api/iter_0000002', 'runs/api/iter_0000004']
print(training.read_metrics("runs/api/metrics.jsonl")[-1])
