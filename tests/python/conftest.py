import os
import sys

import pytest
import torch

# Tests import the package from the build tree unless an installed copy is on sys.path already.
here = os.path.dirname(__file__)
build_python = os.environ.get("DUQUANT_PYTHON_DIR")
if build_python:
    sys.path.insert(0, build_python)
sys.path.insert(0, here)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
