import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. The variable
# is read when a kernel is defined, so it must be set before lighthouse_megatron.ops loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Transformer Engine must load before torch first uses cuDNN: a TE build linking another
    # cuDNN than torch's fails to load, or breaks torch's cuDNN, in the other order.
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # not installed or not usable: the TE tests skip with the reason
        pass


@pytest.fixture(scope="module")
def pytorch_twins():
    """Training on the CPU with the stages' plain-PyTorch twins, as on any CPU machine (this
    conftest sends Triton kernels through the interpreter for the kernel tests)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
