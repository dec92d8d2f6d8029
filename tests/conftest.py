"""Device and dtype for the whole suite come from the environment, so one suite runs on CPU and GPU."""

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("PYTEST_TORCH_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _fresh_cache():
    import autojac

    autojac.clear_cache()
    yield
