"""CLIP's tokenizer without the network: built from the byte-pair merges OpenAI published with CLIP
(``bpe_simple_vocab_16e6.txt.gz``), as the ``openai-clip`` package ships them, for a single-file
SD 1.x or 2.x checkpoint on a machine whose Hugging Face cache lacks the tokenizer (an air-gapped
GPU machine with a ``.safetensors`` file).

The hub's tokenizers (``openai/clip-vit-large-patch14``; SD 2's, which pads with ``!``) were made
from that very file: the vocabulary is the 256 byte characters, the same with ``</w>``, one entry
per merge, then the two special tokens, 49,408 in all. Only the merges are read: the package's code
(which imports torchvision) is never imported.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Any

from model.errors import ModelLoadError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The first line is a version header; CLIP uses the first 48,894 merges (49,152 - 256 - 2).
MERGES = 49152 - 256 - 2
START, END = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 77


def bpe_path() -> Path:
    """Where the installed openai-clip package keeps the merges (found, not imported)."""
    spec = importlib.util.find_spec("clip")  # the openai-clip distribution's package
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / BPE_FILE if locations else None
    if path is None or not path.is_file():
        raise ModelLoadError(
            f"CLIP's byte-pair merges ({BPE_FILE}) are not installed; install this package's "
            "dependencies (openai-clip), or set SD_MODEL_CONFIG to a diffusers folder of the same model"
        )
    return path


def clip_tokenizer(pad_token: str = END) -> Any:
    """A transformers ``CLIPTokenizer`` equal to the hub's CLIP tokenizers, padding with ``pad_token``
    (``<|endoftext|>``: SD 1.x's; ``!``: SD 2.x's)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(bpe_path(), "rt", encoding="utf-8") as file:
        merges = [line.split() for line in file.read().split("\n")[1 : MERGES + 1]]
    characters = list(bytes_to_unicode().values())
    tokens = characters + [f"{c}</w>" for c in characters] + ["".join(pair) for pair in merges] + [START, END]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=[(first, second) for first, second in merges],
        pad_token=pad_token,
        model_max_length=MAX_TOKENS,
    )
