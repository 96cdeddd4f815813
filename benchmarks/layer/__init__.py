"""One attention layer against dense attention (`lighthouse-megatron bench layer` writes the JSON
here) and the kernels' launch-setting sweep (`tune_kernels.py`). See README.md and NOTES.md."""
