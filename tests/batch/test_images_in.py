"""Batch jobs with images in: Azure ML's inpainting batch input (a CSV written by pandas, unnamed
index column first, columns image, mask_image, prompt) with base64 cells and with paths inside the
input folder, each image what the server draws for the same /score row; hostile cells (paths out
of the folder, links, garbage, a mask of another size, URLs) fail their row alone; strength as a
job parameter; a resumed job does not redo finished image rows; cells are read row by row."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from schemas.score import ScoreRequest
from service.batch.files.images import cell
from service.batch.files.inputs import InputFile, parse_file
from service.batch.files.records import PREDICTION_COLUMNS
from service.cli.main import main
from service.runtime.protocols.score import score_ask
from service.storage import open_storage
from tests.helpers.pictures import picture, png_bytes, square_mask

STEPS = 4
FAST = ["--model", "random:tiny", "--steps", str(STEPS), "--batch-size", "4", "--seed", "5"]
SIZE = 128  # random:tiny's native size
TOLERANCE = 2  # of 255: batched and single matrix products round differently on the CPU


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def batch(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    capsys.readouterr()
    code = main(["batch", *args])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else {}), captured.err


def detailed(output: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((output / "predictions-detailed.csv").read_text())))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def online(engine: Any, row: dict[str, str], seed: int, **parameters: Any) -> np.ndarray:
    """What /score draws for the same row and seed (its body parsed as the server parses it)."""
    body = {
        "input_data": {
            "columns": list(row),
            "data": [row],
            "index": [0],
            "parameters": {"num_inference_steps": STEPS, "seed": seed, **parameters},
        }
    }
    request = ScoreRequest.model_validate(body)
    (item,) = score_ask(request.input_data, engine.info).items(engine.info)
    (result,) = engine.generate([item])
    image: np.ndarray = result.image
    return image


def assert_close(drawn: np.ndarray, expected: np.ndarray, what: object) -> None:
    """Equal but for float rounding: a row is drawn in a batch of several, /score's alone."""
    assert drawn.shape == expected.shape, what
    difference = np.abs(drawn.astype(int) - expected.astype(int)).max()
    assert difference <= TOLERANCE, (what, difference)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """An input folder as Azure's inpainting batch sample has it, and pictures beside the CSV."""
    root = tmp_path / "in"
    (root / "pictures").mkdir(parents=True)
    (root / "pictures" / "cat.png").write_bytes(png_bytes(picture(1)))
    (root / "pictures" / "mask.png").write_bytes(png_bytes(square_mask()))
    (root / "pictures" / "wide.jpg").write_bytes(_jpeg(picture(2, (192, 128))))
    return root


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


GOOD = {  # row -> (image cell, mask cell, prompt)
    0: ("b64-lines:cat", "b64:mask", "a cat on a bench"),
    1: ("pictures/cat.png", None, "a cat, oil painting"),
    2: ("pictures/cat.png", "pictures/mask.png", "a cat in a hat"),
    3: ("data:cat", None, "a cat at night"),
    4: (None, None, "a plain prompt, no image"),
    5: ("pictures/wide.jpg", None, "a wide landscape"),
}


def _cell(value: str | None, root: Path) -> str | None:
    """The test's shorthand -> the cell's text."""
    if value is None or ("/" in value and not value.startswith(("b64", "data"))):
        return value
    kind, _, name = value.partition(":")
    data = (root / "pictures" / f"{name}.png").read_bytes()
    if kind == "b64-lines":  # Azure's samples: base64.encodebytes, a line break every 76 characters
        return base64.encodebytes(data).decode()
    return f"data:image/png;base64,{b64(data)}" if kind == "data" else b64(data)


def write_csv(path: Path, rows: list[tuple[str | None, str | None, str]]) -> None:
    """As Azure's samples write it: pandas, its unnamed index column first."""
    frame = pd.DataFrame(rows, columns=["image", "mask_image", "prompt"])
    frame.to_csv(path)
    assert path.read_text().startswith(",image,mask_image,prompt\n")


def test_base64_and_path_cells_draw_what_score_draws_and_hostile_cells_fail_alone(
    folder: Path, tmp_path: Path, tiny_engine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(picture(3)))
    os.symlink(outside, folder / "pictures" / "escape.png")
    png = png_bytes(picture(4))
    (folder / "pictures" / "truncated.png").write_bytes(png[: len(png) // 2])
    with open(folder / "pictures" / "huge.png", "wb") as huge:  # sparse: 21 MiB on paper
        huge.truncate(21 * 2**20)
    (folder / "other.csv").write_text("prompt\nnothing here\n")
    cat, mask, small_mask = (b64(png_bytes(image)) for image in (picture(1), square_mask(), square_mask(64)))
    hostile = {  # row -> (image cell, mask cell, what its error says)
        6: ("../outside.png", None, "'..'"),
        7: (str(outside), None, "absolute path"),
        8: ("pictures/escape.png", None, "symbolic link out of the input folder"),
        9: (b64(b"this is not an image at all, just some text" * 3), None, "not an image"),
        10: ("@@@ not base64 @@@", None, "no file"),
        11: (cat, small_mask, "mask_image: 64x64 pixels, but image has 128x128"),
        12: ("https://example.com/cat.png", None, "URLs are not fetched in batch jobs"),
        13: ("pictures/missing.png", None, "no file 'pictures/missing.png' in the input folder"),
        14: ("pictures/truncated.png", None, "truncated or corrupt"),
        15: ("pictures/huge.png", None, "too large"),
        16: ("other.csv", None, "names a prompt file"),
        17: (None, mask, "mask_image without an image"),
        18: ("pictures", None, "not a regular file"),
    }
    cells = [(_cell(image, folder), _cell(mask, folder), prompt) for image, mask, prompt in GOOD.values()]
    cells += [(image, mask, f"hostile {row}") for row, (image, mask, _) in hostile.items()]
    write_csv(folder / "inpainting.csv", cells)
    out = tmp_path / "out"
    code, summary, err = batch(capsys, "--input", str(folder), "--output", str(out), *FAST)
    assert code == 0, err
    counts = (summary["total"], summary["done"], summary["failed"])
    assert counts == (len(cells) + 1, 7, len(hostile)), summary["failed_rows"]
    # the pictures are skipped as prompt files, without a warning for each
    reasons = {entry["path"]: entry["reason"] for entry in summary["skipped_files"]}
    assert "rows may name it" in reasons["pictures/cat.png"]
    assert not [line for line in err.splitlines() if "skipping" in line and "cat.png" in line], err
    rows = {
        int(r["row_number_per_file"]): r for r in detailed(out) if r["input_csv_name"] == "inpainting.csv"
    }
    for row, (_, _, expected) in hostile.items():
        assert rows[row]["status"] == "failed" and expected in rows[row]["error"], (row, rows[row]["error"])
        assert not (out / "images" / "inpainting" / f"{row}.png").exists()
    # every good row draws what /score draws for the same row, with the row's seed
    for row, (image, mask, prompt) in GOOD.items():
        assert rows[row]["status"] == "ok", rows[row]
        score_row = {"prompt": prompt}
        for name, value in (("image", image), ("mask_image", mask)):
            if value is not None:
                data = (folder / value).read_bytes() if "/" in value else None
                score_row[name] = b64(data) if data is not None else str(_cell(value, folder))
        drawn = pixels(out / rows[row]["generated_image"])
        expected_pixels = online(tiny_engine, score_row, int(rows[row]["seed"]))
        assert_close(drawn, expected_pixels, row)
    assert pixels(out / rows[5]["generated_image"]).shape == (128, 192, 3)  # the image's own size
    # predictions.csv: Azure's five columns, one line per image, as for text to image
    azure = pd.read_csv(out / "predictions.csv", header=None, names=list(PREDICTION_COLUMNS))
    assert azure["generated_image"].tolist() == [
        *(f"images/inpainting/{row}.png" for row in GOOD),
        "images/other/0.png",
    ]
    assert azure["prompt"].tolist()[:6] == [prompt for _, _, prompt in GOOD.values()]


def test_strength_is_a_job_parameter_from_the_flag_or_the_params_file(
    folder: Path, tmp_path: Path, tiny_engine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    write_csv(folder / "one.csv", [("pictures/cat.png", None, "a cat, oil painting")])
    cat = b64((folder / "pictures" / "cat.png").read_bytes())
    for name, extra in [("flag", ["--strength", "0.5"]), ("file", ["--params", str(tmp_path / "p.json")])]:
        (tmp_path / "p.json").write_text('{"strength": 0.5, "guidance_scale": 5}')
        out = tmp_path / name
        code, summary, err = batch(capsys, "--input", str(folder), "--output", str(out), *FAST, *extra)
        assert code == 0, err
        assert summary["parameters"]["strength"] == 0.5
        (row,) = detailed(out)
        guidance = {"guidance_scale": 5.0} if name == "file" else {}
        expected = online(
            tiny_engine, {"prompt": row["prompt"], "image": cat}, int(row["seed"]), strength=0.5, **guidance
        )
        assert np.array_equal(pixels(out / row["generated_image"]), expected), name
        default = online(tiny_engine, {"prompt": row["prompt"], "image": cat}, int(row["seed"]), **guidance)
        assert not np.array_equal(expected, default)  # 0.5 is not the default 0.8
    # out of bounds: refused before the model loads
    for value in ("0", "1.5", "nan"):
        code, _, err = batch(
            capsys, "--input", str(folder), "--output", str(tmp_path / "bad"), *FAST, "--strength", value
        )
        assert code == 2 and "strength" in err, (value, err)
    # another strength than job.json's is another job
    code, _, err = batch(
        capsys, "--input", str(folder), "--output", str(tmp_path / "flag"), *FAST, "--strength", "0.6"
    )
    assert code == 2 and "strength 0.5 there, 0.6 here" in err, err


def test_a_resumed_job_does_not_redo_finished_image_rows(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [(_cell(image, folder), _cell(mask, folder), prompt) for image, mask, prompt in GOOD.values()]
    write_csv(folder / "inpainting.csv", rows)
    out = tmp_path / "out"
    args = ["--input", str(folder), "--output", str(out), *FAST]
    assert batch(capsys, *args)[0] == 0
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == len(GOOD)
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in images}
    # a run killed after row 2's image but before its record; and one before row 3's image
    (out / "records" / "inpainting" / "2.json").unlink()
    (out / "records" / "inpainting" / "3.json").unlink()
    (out / "images" / "inpainting" / "3.png").unlink()
    (out / "summary.json").unlink()
    code, summary, err = batch(capsys, *args)
    assert code == 0, err
    assert (summary["skipped"], summary["generated"], summary["done"]) == (len(GOOD) - 2, 2, len(GOOD))
    for path, (mtime, data) in before.items():
        if path.name in ("2.png", "3.png"):  # drawn again with the same seed, in another batch
            assert_close(pixels(path), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), path)
        else:  # the others untouched
            assert (path.stat().st_mtime_ns, path.read_bytes()) == (mtime, data), path
    # and once more: nothing to do, the same predictions
    tables = (out / "predictions.csv").read_bytes()
    code, summary, _ = batch(capsys, *args)
    assert (code, summary["generated"], (out / "predictions.csv").read_bytes()) == (0, 0, tables)


def test_cells_are_checked_as_rows_are_read_and_images_read_only_when_generated(folder: Path) -> None:
    cat = b64(png_bytes(picture(1)))
    lines = [
        {"prompt": "a", "image": "pictures/cat.png"},
        {"prompt": "b", "image": cat, "mask_image": None},
        {"prompt": "c", "image": 42},
        {"prompt": "d", "image": "", "mask_image": "pictures/mask.png"},
        {"prompt": "e", "image": "s3://bucket/cat.png"},
        {"prompt": "f", "image": "pictures\\cat.png"},
        {"prompt": "g"},
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    rows = list(parse_file(InputFile("p.jsonl"), data, 1, "p.jsonl"))
    # a path stays a path and base64 stays text: no image is read while rows are read or planned
    assert (rows[0].image, rows[0].error) == ("pictures/cat.png", "")
    assert (rows[1].image, rows[1].mask_image, rows[1].error) == (cat, "", "")
    assert "image must be text" in rows[2].error
    assert "mask_image without an image" in rows[3].error
    assert "URLs are not fetched" in rows[4].error
    assert "backslash" in rows[5].error and rows[5].image == ""
    assert (rows[6].image, rows[6].error) == ("", "")
    # pandas' missing value, and Parquet's null, are no image
    assert cell("image", float("nan")) == ("", "") and cell("image", None) == ("", "")
    frame = pd.DataFrame({"prompt": ["x", "y"], "image": ["pictures/cat.png", None]})
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    parquet = list(parse_file(InputFile("p.parquet"), buffer.getvalue(), 1, "p.parquet"))
    assert [(r.image, r.error) for r in parquet] == [("pictures/cat.png", ""), ("", "")]


@pytest.mark.slow
def test_path_cells_are_read_from_blob_inputs(
    root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Paths name files of the input prefix on Azure Blob and S3 as in a local folder."""
    storage = open_storage(f"{root}/in")
    storage.write("pictures/cat.png", png_bytes(picture(1)))
    frame = pd.DataFrame(
        [
            ("pictures/cat.png", None, "a cat"),
            ("pictures/gone.png", None, "no cat"),
            ("../in/pictures/cat.png", None, "out"),
        ],
        columns=["image", "mask_image", "prompt"],
    )
    storage.write("jobs.csv", frame.to_csv().encode())
    code, summary, err = batch(capsys, "--input", f"{root}/in", "--output", f"{root}/out", *FAST)
    assert code == 0, err
    assert (summary["done"], summary["failed"]) == (1, 2)
    errors = [row["error"] for row in summary["failed_rows"]]
    assert "no file 'pictures/gone.png'" in errors[0] and "'..'" in errors[1], errors
    with Image.open(io.BytesIO(open_storage(f"{root}/out").read("images/jobs/0.png"))) as image:
        assert image.size == (SIZE, SIZE)
