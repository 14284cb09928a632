"""Set-up shared by every test module: this folder on the import path (pytest puts a conftest's folder there, so
``import condfakes``, ``layouts``, ``corpus`` work from any test), the Hugging Face hub offline (no test uses the
network), and the ``one_thread`` fixture modules of tiny models ask for with
``pytestmark = pytest.mark.usefixtures("one_thread")``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and many times faster than on two of a busy machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
