"""The model library (SD_MODELS) checked without loading weights: every kind of entry described as
the loader would load it, each broken one a single problem that names it while the others stay,
and content hashes that are A1111's for a file, stable, cached, and changed with the weights.

Real files throughout: folders written by diffusers' own save_pretrained, single files converted
from them, and files with exactly the tensors a published checkpoint is recognised by."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.errors import ModelLoadError
from model.export import RANDOM_MARKER
from model.library import LibraryProblem, ModelEntry, inspect_entry, scan_library
from model.library.catalog import CAPABILITIES, entry_name
from model.library.hashes import CACHE_FILE, content_hash, short_hash
from model.loading import AZUREML_MODEL_SUBDIR, load_components
from tests.helpers.weights import save_single_file, save_with_diffusers

SD1_TO_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_with_diffusers(tmp_path_factory.mktemp("tiny") / "tiny", "tiny", 1)


@pytest.fixture(scope="module")
def inpaint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_with_diffusers(tmp_path_factory.mktemp("inpaint") / "inpaint", "tiny-inpaint", 2)


@pytest.fixture(scope="module")
def half(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_with_diffusers(tmp_path_factory.mktemp("half") / "half", "tiny", 3, variant="fp16")


@pytest.fixture(scope="module")
def single(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny as one LDM-layout checkpoint: no published architecture, so it needs its configs."""
    return save_single_file(tiny, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def published(out: Path, channels: int = 4) -> Path:
    """A file with the tensors by which an SD 1.x checkpoint is recognised (names and shapes)."""
    tensors = {
        SD1_TO_K: torch.zeros(320, 768, dtype=torch.float16),
        UNET_IN: torch.zeros(320, channels, 3, 3, dtype=torch.float16),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
    }
    save_file(tensors, out)
    return out


def weights(folder: Path, variant: str | None = None) -> list[Path]:
    """The networks' weight files of one variant (None: the plain ``*.safetensors``)."""
    return sorted(
        file
        for part in ("unet", "vae", "text_encoder", "safety_checker")
        for file in (folder / part).glob("*.safetensors")
        if (f".{variant}." in file.name if variant else file.name.count(".") == 1)
    )


def corrupt_data(file: Path) -> None:
    """Every byte after the header overwritten: the tensors are garbage, the header whole."""
    with file.open("r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        size = file.stat().st_size - 8 - length
        handle.seek(8 + length)
        handle.write(b"\xff" * size)


@pytest.fixture
def library(tmp_path: Path, tiny: Path, inpaint: Path, single: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(tiny, root / "tiny")
    shutil.copytree(inpaint, root / "inpaint")
    shutil.copytree(tiny, root / "azure" / AZUREML_MODEL_SUBDIR)
    shutil.copytree(tiny, root / "made")
    (root / "made" / RANDOM_MARKER).write_text("random:tiny:1\n")
    published(root / "sd14.safetensors")
    shutil.copy(single, root / "custom.safetensors")
    shutil.copytree(tiny, root / "custom")  # configs beside the file of its name
    shutil.copytree(tiny, root / ".trash")
    for name in ("README.md", "notes.json", "sd14.yaml", ".DS_Store", "custom.txt"):
        (root / name).write_text("not a model\n")
    return root


def test_a_library_folder_lists_each_model_by_name_and_passes_over_everything_else(
    library: Path, tiny: Path
) -> None:
    entries, problems = scan_library(str(library))

    assert problems == []
    by_name = {entry.name: entry for entry in entries}
    assert [entry.name for entry in entries] == ["azure", "custom", "inpaint", "made", "sd14", "tiny"]
    plain = by_name["tiny"]
    assert plain == ModelEntry(
        name="tiny",
        spec=str((library / "tiny").absolute()),
        architecture="custom",  # diffusers' own folder of a non-SD UNet: what the loader calls it
        inpainting=False,
        native_height=128,
        native_width=128,
        bytes=sum(file.stat().st_size for file in weights(tiny)),
    )
    assert plain.kind == "text-to-image" and plain.capabilities == CAPABILITIES
    assert by_name["inpaint"].inpainting and by_name["inpaint"].kind == "inpainting"
    assert by_name["made"].architecture == "tiny"  # make-model's marker, as load_components reads it
    assert by_name["azure"].spec == str((library / "azure").absolute())
    assert by_name["azure"].bytes == plain.bytes
    sd14 = by_name["sd14"]
    assert (sd14.architecture, sd14.native_height, sd14.inpainting) == ("sd-v1-4", 512, False)
    assert sd14.bytes == (library / "sd14.safetensors").stat().st_size and sd14.config is None
    custom = by_name["custom"]
    assert custom.config == str(library / "custom") and custom.spec.endswith("custom.safetensors")
    assert (custom.architecture, custom.native_width) == ("custom", 128)


def test_a_nine_channel_checkpoint_is_an_inpainting_model(tmp_path: Path) -> None:
    entry = inspect_entry(str(published(tmp_path / "inpainting.safetensors", channels=9)))
    assert entry.name == "inpainting" and entry.inpainting and entry.architecture == "sd-v1-4"


def test_each_entry_describes_what_the_loader_then_loads(library: Path) -> None:
    entries, _ = scan_library(str(library))
    for entry in entries:
        if entry.name == "sd14":
            continue  # only the tensors it is recognised by
        components = load_components(entry.spec, torch.float32, entry.variant, entry.config)
        unet, vae = components.unet.config, components.vae.config
        assert (unet.in_channels == 9) == entry.inpainting, entry.name
        scale = 2 ** (len(vae.block_out_channels) - 1)  # as diffusers' pipelines compute it
        assert unet.sample_size * scale == entry.native_height, entry.name


def test_each_broken_entry_is_one_problem_that_names_it_and_the_good_ones_stay(
    tmp_path: Path, tiny: Path, single: Path
) -> None:
    root = tmp_path / "models"
    for name in ("good", "garbled", "truncated", "unweighted", "emptied"):
        shutil.copytree(tiny, root / name)
    (root / "garbled" / "model_index.json").write_text("{not json")
    unet = root / "truncated" / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:-100])
    (root / "unweighted" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(root / "emptied" / "vae")
    (root / "vae").mkdir()  # a folder with no model in it
    (root / "zero.safetensors").write_bytes(b"")
    (root / "cut.safetensors").write_bytes((single.read_bytes())[:5000])
    shutil.copy(single, root / "lonely.safetensors")  # no published architecture, no configs
    (root / "my model.safetensors").write_bytes(published(tmp_path / "p.safetensors").read_bytes())

    entries, problems = scan_library(str(root))

    assert [entry.name for entry in entries] == ["good"]
    reasons = {problem.entry: problem.reason for problem in problems}
    assert sorted(reasons) == sorted(
        ["garbled", "truncated", "unweighted", "emptied", "vae", "zero", "cut", "lonely", "my model"]
    )
    assert all(isinstance(problem, LibraryProblem) and "\n" not in problem.reason for problem in problems)
    assert "model_index.json" in reasons["garbled"]
    assert "truncated" in reasons["truncated"] and "unet" in reasons["truncated"]
    assert "holds no weights" in reasons["unweighted"]
    assert "vae" in reasons["emptied"]
    assert "no diffusers model" in reasons["vae"]
    assert "empty" in reasons["zero"]
    assert "not a whole safetensors file" in reasons["cut"] or "truncated" in reasons["cut"]
    assert "SD_MODEL_CONFIG" in reasons["lonely"] and "lonely/" in reasons["lonely"]
    assert "rename it" in reasons["my model"]


def test_the_scan_reads_headers_never_tensor_data(tmp_path: Path, tiny: Path) -> None:
    folder = shutil.copytree(tiny, tmp_path / "damaged")
    for file in weights(folder):
        corrupt_data(file)
    corrupt_data(published(tmp_path / "sd14.safetensors"))

    entries, problems = scan_library(f"{folder},{tmp_path / 'sd14.safetensors'}")

    assert problems == [] and [entry.name for entry in entries] == ["damaged", "sd14"]


def test_a_folder_that_is_one_model_is_a_library_of_that_model(tmp_path: Path, tiny: Path) -> None:
    assert [entry.name for entry in scan_library(str(tiny))[0]] == ["tiny"]
    azure = tmp_path / "registered"
    shutil.copytree(tiny, azure / AZUREML_MODEL_SUBDIR)
    assert [entry.name for entry in scan_library(str(azure))[0]] == ["registered"]


def test_list_items_keep_their_order_and_may_be_named(tiny: Path) -> None:
    entries, problems = scan_library(
        f" small=random:tiny:3, {tiny} ,random:tiny-inpaint,, big=random:sd-v1-4"
    )

    assert problems == []
    assert [entry.name for entry in entries] == ["small", "tiny", "random:tiny-inpaint", "big"]
    small, _, inpainting, big = entries
    assert small == ModelEntry("small", "random:tiny:3", "tiny", False, 128, 128, 0)
    assert inpainting.inpainting and inpainting.architecture == "tiny-inpaint"
    assert (big.architecture, big.native_width, big.bytes) == ("sd-v1-4", 512, 0)


def test_a_second_entry_of_a_name_is_a_problem(tmp_path: Path, single: Path) -> None:
    entries, problems = scan_library("a=random:tiny, a=random:tiny:2, random:nope, b c=random:tiny")
    assert [entry.spec for entry in entries] == ["random:tiny"]
    assert [problem.entry for problem in problems] == ["a", "random:nope", "b c"]
    assert "listed before it" in problems[0].reason and "unknown random model" in problems[1].reason

    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(single, root / "twice.ckpt")  # any bytes: a .ckpt is not read
    published(root / "twice.safetensors")
    entries, problems = scan_library(str(root))
    assert [entry.spec for entry in entries] == [str(root / "twice.ckpt")]
    assert [problem.entry for problem in problems] == ["twice"]


def test_a_checkpoint_pickle_is_accepted_by_its_name_and_described_by_configs_beside_it(
    tmp_path: Path, tiny: Path
) -> None:
    ckpt = save_single_file(tiny, tmp_path / "old.ckpt")
    entry = inspect_entry(str(ckpt))
    assert (entry.architecture, entry.native_height, entry.bytes) == ("unknown", 512, ckpt.stat().st_size)
    shutil.copytree(tiny, tmp_path / "old")
    entry = inspect_entry(str(ckpt))
    assert (entry.architecture, entry.native_height, entry.config) == ("custom", 128, str(tmp_path / "old"))


def test_an_explicit_config_describes_a_single_file(single: Path, tiny: Path) -> None:
    entries, problems = scan_library(str(single), config=str(tiny))
    assert problems == [] and entries[0].config == str(tiny) and entries[0].native_height == 128
    assert scan_library(str(single))[1][0].entry == "tiny"  # no configs: its architecture is unknown


def test_weight_variants_are_chosen_as_the_loader_chooses_them(
    tmp_path: Path, tiny: Path, half: Path
) -> None:
    entry = inspect_entry(str(half))
    assert entry.variant == "fp16" and entry.bytes == sum(f.stat().st_size for f in weights(half, "fp16"))

    both = shutil.copytree(tiny, tmp_path / "both")
    for file in weights(half, "fp16"):
        shutil.copy(file, both / file.relative_to(half))
    plain, fp16 = inspect_entry(str(both)), inspect_entry(str(both), variant="fp16")
    assert plain.variant is None and plain.bytes == sum(f.stat().st_size for f in weights(tiny))
    assert fp16.variant == "fp16" and fp16.bytes == entry.bytes
    with pytest.raises(ModelLoadError, match=r"^both: .*SD_MODEL_VARIANT"):
        inspect_entry(str(both), "both", variant="bf16")


def test_a_hub_id_resolves_from_the_local_cache_only(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someone--tiny"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny, repo / "snapshots" / commit)

    entries, problems = scan_library("someone/tiny, someone/absent")

    assert [(entry.name, entry.spec) for entry in entries] == [("someone/tiny", "someone/tiny")]
    assert problems[0].entry == "someone/absent" and "not in the local cache" in problems[0].reason


def test_an_entry_that_cannot_serve_raises_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^nowhere: .*check the path"):
        inspect_entry(str(tmp_path / "nowhere"), "nowhere")
    with pytest.raises(ModelLoadError, match=r"^random:tiny:x: .*bad seed"):
        inspect_entry("random:tiny:x")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match=r"not a checkpoint"):
        inspect_entry(str(tmp_path / "notes.txt"), "notes")


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("random:tiny:3", "random:tiny:3"),
        ("org/model", "org/model"),
        ("/models/v1-5-pruned.safetensors", "v1-5-pruned"),
        ("/models/anything.fp16.safetensors", "anything.fp16"),
        ("/models/old.ckpt", "old"),
        ("/models/folder/", "folder"),
    ],
)
def test_entry_names(spec: str, name: str) -> None:
    assert entry_name(spec) == name


# ---------------------------------------------------------------------------------------- hashes
def test_a_single_file_hashes_as_a1111_hashes_it_and_the_cache_spares_a_second_read(
    tmp_path: Path,
) -> None:
    file = published(tmp_path / "model.safetensors")
    entry = inspect_entry(str(file))
    expected = hashlib.sha256(file.read_bytes()).hexdigest()
    cache = tmp_path / "cache"

    assert content_hash(entry, cache) == expected == content_hash(entry, None)
    assert short_hash(expected) == expected[:10]
    record = json.loads((cache / CACHE_FILE).read_text())[str(file)]
    assert record["sha256"] == expected and record["size"] == file.stat().st_size

    # other bytes, same size and time: the cached hash is taken (the file is not read again)
    stat = file.stat()
    corrupt_data(file)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert content_hash(entry, cache) == expected
    # a newer time: read again
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = content_hash(entry, cache)
    assert changed == hashlib.sha256(file.read_bytes()).hexdigest() != expected

    (cache / CACHE_FILE).write_text("{garbage")
    assert content_hash(entry, cache) == changed
    assert json.loads((cache / CACHE_FILE).read_text())[str(file)]["sha256"] == changed
    assert [p.name for p in cache.iterdir()] == [CACHE_FILE]  # no temporary file left behind

    file.unlink()
    assert content_hash(entry, cache) is None


def test_a_folder_hash_covers_its_chosen_weights_and_nothing_else(
    tmp_path: Path, tiny: Path, half: Path
) -> None:
    folder = shutil.copytree(tiny, tmp_path / "model")
    entry = inspect_entry(str(folder))
    cache = tmp_path / "cache"
    first = content_hash(entry, cache)
    assert first is not None and first == content_hash(entry, cache) == content_hash(entry, None)

    (folder / "README.md").write_text("about this model\n")
    for file in weights(half, "fp16"):
        shutil.copy(file, folder / file.relative_to(half))
    assert content_hash(entry, cache) == first  # a README and another variant: not what it loads
    fp16 = inspect_entry(str(folder), variant="fp16")
    assert content_hash(fp16, cache) not in (None, first)

    corrupt_data(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert content_hash(entry, cache) not in (None, first)
    shutil.rmtree(folder)
    assert content_hash(entry, cache) is None


def test_a_random_model_hashes_as_its_spec() -> None:
    entry = inspect_entry("random:tiny:4")
    assert content_hash(entry, None) == hashlib.sha256(b"random:tiny:4").hexdigest()
