"""A GPU suite run's folder as markdown (``gpu_suite.py --report DIR``): the stages, the cases
with their speedups over stock diffusers, the profiles, and the goals judged.
"""

from __future__ import annotations

from typing import Any

from gpu_plan import ENGINE_VARIANTS, MAX_MEAN_ABS_DIFF, STAGES, read_record

GOALS = {"latency_s": 0.30, "throughput": 6.0, "speedup_b1": 2.5, "speedup_b16": 1.8}


def report(out: str) -> str:
    """A run's folder as markdown: stages, cases with speedups, profiles, and the goals."""
    records = [r for i, (name, _, _) in enumerate(STAGES, start=1) if (r := read_record(out, i, name))]
    env: dict[str, Any] = next((r.get("environment", {}) for r in records if r["name"] == "environment"), {})
    dry = any(r.get("dry_run") for r in records)
    lines = [
        f"# GPU suite{' (dry run on CPU)' if dry else ''}: {env.get('gpu', 'no GPU')}",
        "",
        f"{next((r.get('started') for r in records), '?')}; torch {env.get('torch')}, "
        f"CUDA {env.get('cuda')}, "
        f"diffusers {env.get('diffusers')}, transformers {env.get('transformers')}, "
        f"driver `{env.get('nvidia_smi') or '-'}`",
        "",
        "| stage | status | wall s | budget s | skipped for time / reason |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        why = "; ".join(r.get("skipped_for_time", []) + ([r["reason"]] if r.get("reason") else []))
        if r.get("error"):
            why = (why + "; " if why else "") + r["error"]
        lines.append(
            f"| {r['stage']} {r['name']} | {r['status']} | {r.get('wall_s', '-')} | "
            f"{r.get('budget_s', '-')} | {why or '-'} |"
        )
    base = {c["batch_size"]: c for r in records if r["name"] == "diffusers" for c in r.get("cases", [])}
    lines += [
        "",
        "| stage | variant | model | batch | s/image | images/s | peak GiB | MFU | x diffusers "
        "| mean abs diff | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["name"] in ("profile", "tests", "environment"):
            continue
        config = r.get("config", {})
        for c in r.get("cases", []):
            ref = base.get(c["batch_size"]) if r["name"] != "sd2" else None
            speedup = ref["seconds_per_image"] / c["seconds_per_image"] if ref else None
            cells = [
                r["stage"],
                config.get("variant", "-"),
                config.get("model", "-"),
                c["batch_size"],
                f"{c['seconds_per_image']:.4f}",
                f"{c['images_per_s']:.2f}",
                _fmt(c.get("peak_gib"), ".1f"),
                _percent(c["mfu"]),
                _fmt(speedup, ".2f"),
                _fmt(c.get("mean_abs_diff_vs_diffusers"), ".5f"),
                c["timed_runs"],
            ]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    for r in records:
        if r["name"] != "profile":
            continue
        lines += [
            "",
            f"Profile of `{r.get('config', {}).get('variant')}` "
            f"({r.get('config', {}).get('variant_reason', '')}):",
        ]
        for c in r.get("cases", []):
            lines += [
                "",
                f"batch {c['batch_size']}: {c['step_wall_ms']:.2f} ms per step (wall), "
                f"{c['kernel_ms_per_step']:.2f} ms of {c['timed']}, "
                f"{c['kernel_launches_per_step']:.0f} calls per step",
                "",
                "| kernel | ms/step | share | calls/step |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| `{k['name'][:90]}` | {k['ms_per_step']:.3f} | {_fmt(k['share'], '.1%')} "
                f"| {k['calls_per_step']:.0f} |"
                for k in c["top_kernels"]
            ]
    lines += ["", *goals(records, dry)]
    return "\n".join(lines) + "\n"


def goals(records: list[dict[str, Any]], dry: bool) -> list[str]:
    by_name = {r["name"]: r for r in records}

    def cases(name: str) -> dict[int, dict[str, Any]]:
        r = by_name.get(name)
        return {c["batch_size"]: c for c in r.get("cases", [])} if r and r["status"] == "ok" else {}

    stock = cases("diffusers")
    variants = {name: cases(name) for name in ENGINE_VARIANTS if cases(name)}
    if not variants:
        return ["Goals: not judged (no engine variant finished)."]
    small, large = min(stock or next(iter(variants.values()))), max(stock or next(iter(variants.values())))

    def best(batch: int) -> tuple[str, dict[str, Any]] | None:
        found = [(name, c[batch]) for name, c in variants.items() if batch in c]
        return min(found, key=lambda nc: nc[1]["seconds_per_image"]) if found else None

    rows = []
    one, many = best(small), best(large)
    if one:
        rows.append(
            (
                f"batch-{small} latency <= {GOALS['latency_s']} s/image",
                f"{one[1]['seconds_per_image']:.4f} ({one[0]})",
                one[1]["seconds_per_image"] <= GOALS["latency_s"],
            )
        )
    if many:
        rows.append(
            (
                f"throughput >= {GOALS['throughput']} images/s (batch {large})",
                f"{many[1]['images_per_s']:.2f} ({many[0]})",
                many[1]["images_per_s"] >= GOALS["throughput"],
            )
        )
    for batch, goal in ((small, GOALS["speedup_b1"]), (large, GOALS["speedup_b16"])):
        pick = best(batch)
        if pick and batch in stock:
            ratio = stock[batch]["seconds_per_image"] / pick[1]["seconds_per_image"]
            rows.append(
                (f">= {goal}x stock diffusers at batch {batch}", f"{ratio:.2f}x ({pick[0]})", ratio >= goal)
            )
    diffs: list[float] = [
        c["mean_abs_diff_vs_diffusers"]
        for cs in variants.values()
        for c in cs.values()
        if c.get("mean_abs_diff_vs_diffusers") is not None
    ]
    if diffs:
        rows.append(
            (
                f"images within {MAX_MEAN_ABS_DIFF} mean abs of stock",
                f"max {max(diffs):.5f}",
                max(diffs) < MAX_MEAN_ABS_DIFF,
            )
        )
    head = "Goals (H200, 512x512, 50 steps, fp16, checker on)" + (
        ": a dry run on CPU, so these say nothing about the goals" if dry else ""
    )
    return [head, "", "| goal | measured | met |", "|---|---|---|"] + [
        f"| {goal} | {value} | {'yes' if met else 'no'} |" for goal, value, met in rows
    ]


def _percent(value: float) -> str:
    return f"{value:.1%}" if value >= 0.001 else f"{value:.1e}"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)
