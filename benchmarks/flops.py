"""Model FLOPs, counted rather than assumed: torch.utils.flop_counter over one pass of each network.

    python benchmarks/flops.py --archs sd-v1-4,sd-2-base --size 512 \
        --json benchmarks/results/flops.json --md benchmarks/results/flops.md

What is counted, for a random-weight architecture (the published configs) at SIZE x SIZE:
- one guided UNet step: the UNet at batch 2 (uncond + cond latents of one image);
- one VAE decode of one image's latents;
- one safety-checker pass of one image (224x224 CLIP input), as the engine runs it;
- one text-encoder pass at batch 2 (prompt + negative prompt), for completeness.
The networks are built on the meta device (no memory, no arithmetic, a second or two) and
attention runs through SDPA's math backend, so that it is counted as the matmuls it is; the CPU
gives the same counts (tests check that on random:tiny). FlopCounterMode counts matrix products
and convolutions (2 FLOPs per multiply-add), which is what model-FLOPs utilisation is measured in.

Every MFU figure of the benchmarks comes from these counts (``image_tflop``), read from
benchmarks/results/flops.json when it has the architecture and size, counted on the fly otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "flops.json"
PARTS = ("unet_guided_step", "vae_decode", "safety_checker", "text_encoder_guided")


def _counted(fn: Any) -> tuple[float, dict[str, float]]:
    """(total TFLOP, TFLOP by aten op) of ``fn()``, attention as matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op): n / 1e12 for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops() / 1e12, by_op


def count(arch: str, size: int = 512, device: str = "meta") -> dict[str, Any]:
    """TFLOP of each part of one image's generation for the random architecture ``arch``.

    Steps: 1) build the networks on ``device``, 2) count the guided UNet step, 3) the VAE decode,
    4) the safety checker, 5) the text encoder.
    """
    from model.architectures import build_components
    from model.safety import nsfw_flags

    # 1) the published configs; on meta no weight is drawn
    with torch.device(device):
        parts = build_components(arch)
    unet, vae, text_encoder, checker = (
        parts["unet"],
        parts["vae"],
        parts["text_encoder"],
        parts["safety_checker"],
    )
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_side = size // scale
    tokens = parts["tokenizer"].model_max_length
    result: dict[str, Any] = {"arch": arch, "size": size, "counted_on": device, "by_op": {}}
    # 2) uncond + cond latents of one image in one call, as the engine and diffusers run it
    latents = torch.randn(2, unet.config.in_channels, latent_side, latent_side, device=device)
    context = torch.randn(2, tokens, unet.config.cross_attention_dim, device=device)
    timestep = torch.tensor(981, device=device)
    total, by_op = _counted(lambda: unet(latents, timestep, encoder_hidden_states=context))
    result["unet_guided_step_tflop"], result["by_op"]["unet_guided_step"] = total, by_op
    # 3) one image's latents to pixels
    one = torch.randn(1, vae.config.latent_channels, latent_side, latent_side, device=device)
    total, by_op = _counted(lambda: vae.decode(one))
    result["vae_decode_tflop"], result["by_op"]["vae_decode"] = total, by_op
    # 4) the checker sees a 224x224 crop whatever the image size
    if checker is not None:
        clip_side = int(checker.config.vision_config.image_size)
        clip_input = torch.randn(1, 3, clip_side, clip_side, device=device)
        total, by_op = _counted(lambda: nsfw_flags(checker, clip_input))
        result["safety_checker_tflop"], result["by_op"]["safety_checker"] = total, by_op
    else:
        result["safety_checker_tflop"] = None
    # 5) prompt and negative prompt
    ids = torch.zeros(2, tokens, dtype=torch.long, device=device)
    total, by_op = _counted(lambda: text_encoder(ids))
    result["text_encoder_guided_tflop"], result["by_op"]["text_encoder_guided"] = total, by_op
    return result


def image_tflop(entry: dict[str, Any], steps: int, checker: bool = True) -> float:
    """Model TFLOP of one guided image of ``steps`` steps: steps x UNet + decode (+ checker) + text."""
    total: float = steps * entry["unet_guided_step_tflop"] + entry["vae_decode_tflop"]
    total += entry["text_encoder_guided_tflop"]
    if checker and entry.get("safety_checker_tflop"):
        total += entry["safety_checker_tflop"]
    return total


def lookup(arch: str, size: int, path: Path = RESULTS) -> tuple[dict[str, Any], str]:
    """(counts, their source): the committed file when it has ``arch`` at ``size``, else counted now."""
    if path.is_file():
        table = json.loads(path.read_text()).get("models", {})
        entry = table.get(arch)
        if entry is not None and entry.get("size") == size:
            return entry, "benchmarks/results/flops.json" if path == RESULTS else str(path)
    return count(arch, size), "counted now (meta device)"


def write(entries: list[dict[str, Any]], json_path: Path, md_path: Path | None, command: str) -> None:
    import diffusers
    import transformers

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "counter": "torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add; matmuls and convs)",
        "attention": "SDPA math backend, counted as its matmuls",
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "image_tflop": "steps x unet_guided_step + vae_decode + safety_checker (if any) "
        "+ text_encoder_guided",
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "models": {e["arch"]: e for e in entries}}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    if md_path is None:
        return
    lines = [
        "# Counted model FLOPs (TFLOP)",
        "",
        f"{meta['date']}, `{command}`, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}. {meta['counter']}; attention: {meta['attention']}.",
        "",
        "| model | size | guided UNet step (batch 2) | VAE decode | safety checker | text encoder (batch 2) "
        "| 50-step image | 25-step image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        checker = "-" if e["safety_checker_tflop"] is None else f"{e['safety_checker_tflop']:.4f}"
        lines.append(
            f"| {e['arch']} | {e['size']} | {e['unet_guided_step_tflop']:.4f} | {e['vae_decode_tflop']:.4f} "
            f"| {checker} | {e['text_encoder_guided_tflop']:.4f} | {image_tflop(e, 50):.2f} "
            f"| {image_tflop(e, 25):.2f} |"
        )
    lines += [
        "",
        "50-step image = 50 x UNet step + VAE decode + checker + text encoder; at 790 TFLOP/s "
        "(the H200's measured dense fp16/bf16 peak) that is the floor in seconds per image:",
        "",
    ]
    for e in entries:
        lines.append(f"- {e['arch']}: {image_tflop(e, 50) / 790:.4f} s")
    md_path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="sd-v1-4,sd-2-base")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--device", default="meta", help="meta (default) or cpu")
    p.add_argument("--json", default=str(RESULTS))
    p.add_argument("--md", default=str(RESULTS.with_suffix(".md")))
    args = p.parse_args(argv)
    entries = [count(arch, args.size, args.device) for arch in args.archs.split(",")]
    for e in entries:
        checker = "-" if e["safety_checker_tflop"] is None else f"{e['safety_checker_tflop']:.4f}"
        print(
            f"{e['arch']} {e['size']}x{e['size']}: UNet step {e['unet_guided_step_tflop']:.4f}, "
            f"VAE decode {e['vae_decode_tflop']:.4f}, checker {checker}, "
            f"text {e['text_encoder_guided_tflop']:.4f}, 50-step image {image_tflop(e, 50):.2f} TFLOP"
        )
    command = " ".join(["python", "benchmarks/flops.py", *(sys.argv[1:] if argv is None else argv)])
    write(entries, Path(args.json), Path(args.md) if args.md else None, command)
    print(f"wrote {args.json}" + (f" and {args.md}" if args.md else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
