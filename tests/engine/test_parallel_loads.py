"""Several engines loading one weight folder at once, as a server with SD_DEVICES=cpu,cpu does.

diffusers builds models under accelerate's init_empty_weights, which patches torch.nn.Module for
the whole process: a second load inside that window used to build meta tensors. The test holds the
first load inside the window until the second has entered it (or two seconds have passed, which is
what a correct loader makes it do), so the overlap happens on every run, not one run in three.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import accelerate
import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_model, single_file_utils

import model
from model.types import GenerationItem
from tests.helpers.weights import save_single_file, save_with_diffusers

ITEM = GenerationItem(prompt="a lighthouse", seed=3, num_inference_steps=2, height=128, width=128)
WAIT_S = 2.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_with_diffusers(tmp_path_factory.mktemp("weights") / "sd", seed=7)


@pytest.fixture(scope="module")
def single(folder: Path) -> Path:
    return save_single_file(folder, folder.parent / "sd.safetensors")


class Overlap:
    """Wraps accelerate.init_empty_weights: the first load to enter waits there for a second one;
    the second leaves only after the first has left (the order that broke loads before)."""

    def __init__(self) -> None:
        self.original = accelerate.init_empty_weights
        self.entries = 0
        self.lock = threading.Lock()
        self.second_inside = threading.Event()
        self.first_left = threading.Event()
        self.overlapped = False

    @contextlib.contextmanager
    def __call__(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        with self.lock:
            index, self.entries = self.entries, self.entries + 1
        with self.original(*args, **kwargs):
            if index == 0:
                self.overlapped = self.second_inside.wait(WAIT_S)
                yield
            else:
                self.second_inside.set()
                yield
                self.first_left.wait(WAIT_S)
        if index == 0:
            self.first_left.set()


@pytest.mark.parametrize("kind", ["folder", "single file"])
def test_two_loads_at_once_both_work_and_draw_the_same_image(
    folder: Path, single: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    spec = str(folder if kind == "folder" else single)
    alone = model.load(spec, device="cpu", config=str(folder)).generate([ITEM])[0].image
    register = torch.nn.Module.register_parameter
    overlap = Overlap()
    # diffusers' folder loader calls accelerate.init_empty_weights; its single-file loaders hold
    # their own reference to it
    monkeypatch.setattr(accelerate, "init_empty_weights", overlap)
    for module in (single_file_utils, single_file_model):
        monkeypatch.setattr(module, "init_empty_weights", overlap)
    with ThreadPoolExecutor(2) as pool:
        loads = [pool.submit(model.load, spec, "cpu", config=str(folder)) for _ in range(2)]
        engines = [load.result() for load in loads]
    assert overlap.entries >= 2  # the wrapper was in the path of both loads
    assert not overlap.overlapped  # one read at a time: the second never entered during the first
    assert torch.nn.Module.register_parameter is register  # no meta patch left behind
    for engine in engines:
        assert np.array_equal(engine.generate([ITEM])[0].image, alone)
