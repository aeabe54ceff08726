"""A CLIP byte-level BPE tokenizer built locally, so random-weight models need no download.

It has CLIP's byte alphabet (every string tokenizes; nothing is unknown) and its special tokens,
but no learned merges: each character is a token. Timings and shapes do not depend on the merges,
since prompts are always padded to 77 tokens.
"""

from __future__ import annotations

from transformers import CLIPTokenizer

MAX_LENGTH = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """CLIP's (and GPT-2's) reversible map from the 256 bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def build_clip_tokenizer() -> CLIPTokenizer:
    """Steps: 1) byte alphabet, 2) the same with CLIP's end-of-word suffix, 3) special tokens."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_LENGTH)
    return tokenizer
