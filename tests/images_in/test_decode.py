"""read_image on hostile and on unusual but valid files; to_rgb and to_mask against diffusers;
output_size. Every file is made here with Pillow (or by hand, where Pillow will not write it)."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.images_in import ImageInputError, ImageUrlRefusedError, output_size, read_image, to_mask, to_rgb
from service.images_in.decode import MAX_INPUT_PIXELS, normalise_mode

FIELD = "init_images[0]"


def gradient(width: int = 48, height: int = 32, mode: str = "RGB") -> Image.Image:
    """A smooth picture: lossy codecs keep it close, and a resize of it is a fair comparison."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8)).convert(mode)


def encoded(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def hand_png(width: int, height: int) -> bytes:
    """A grayscale PNG whose header claims width x height, with one row of real data: the header is
    all that a size check may read, so a huge claim costs nothing to build."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * (1 + min(width, 64)))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def refused(value: Any, field: str = FIELD, **options: Any) -> ImageInputError:
    """The error read_image raises, checked for what every such error must be."""
    with pytest.raises(ImageInputError) as caught:
        read_image(value, field, **options)
    error = caught.value
    assert error.field == field
    assert str(error).startswith(f"{field}: ")
    if isinstance(value, str) and len(value.strip()) >= 8:
        assert value.strip()[:40] not in str(error), "the message repeats the client's content"
    return error


def noise(width: int, height: int) -> Image.Image:
    """Pixels that do not compress: a cut file then really lacks most of them."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), (i * 80, 0, 0)) for i in range(3)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def animated_png() -> bytes:
    frames = [Image.new("RGB", (8, 8), (i * 80, 0, 0)) for i in range(3)]
    return encoded(frames[0], "PNG", save_all=True, append_images=frames[1:])


def multipage_tiff() -> bytes:
    return encoded(Image.new("L", (8, 8)), "TIFF", save_all=True, append_images=[Image.new("L", (8, 8), 9)])


HOSTILE: dict[str, tuple[Any, str]] = {
    "not base64": ("%%% this is not base64 at all %%%", "not base64"),
    "base64 of impossible length": ("QUJDRAEEE", "not base64"),
    "not ascii": ("ÿÿÿÿÿÿÿÿ", "not base64"),
    "padding inside": ("QUJD=RA==", "not base64"),
    "base64 of text": (base64.b64encode(b"just some text, not a picture at all").decode(), "accepted format"),
    "empty string": ("", "empty"),
    "blank string": ("  \n\t ", "empty"),
    "empty bytes": (b"", "empty"),
    "not a string": (12345, "base64 string"),
    "data URL of text": ("data:text/plain;base64,aGVsbG8gd29ybGQ=", "data:image/<type>;base64"),
    "data URL without base64": ("data:image/png,rawbytesrawbytes", "data:image/<type>;base64"),
    "EPS": (encoded(gradient(), "EPS"), "accepted format"),
    "PDF-like": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj", "accepted format"),
    "bomb 100000x100000": (hand_png(100_000, 100_000), "pixels"),
    "header 5000x5000": (hand_png(5000, 5000), "5000x5000"),
    "side over 16384": (hand_png(20_000, 8), "20000x8"),
    "zero width": (hand_png(0, 10), "image"),
    "zero height": (hand_png(10, 0), "image"),
    "truncated PNG": (encoded(noise(128, 128))[:20_000], "truncated or corrupt"),
    "truncated JPEG": (encoded(noise(128, 128), "JPEG", quality=95)[:8000], "truncated or corrupt"),
    "animated GIF": (animated_gif(), "single still image"),
    "APNG": (animated_png(), "single still image"),
    "multi-page TIFF": (multipage_tiff(), "single still image"),
    "PNG signature only": (b"\x89PNG\r\n\x1a\n", "image"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_is_an_image_input_error_naming_the_field(name: str) -> None:
    value, expected = HOSTILE[name]
    error = refused(value)
    assert not isinstance(error, ImageUrlRefusedError)
    assert expected in str(error)


def test_the_hostile_files_are_also_refused_as_base64() -> None:
    for name in ("EPS", "bomb 100000x100000", "truncated PNG", "APNG"):
        refused(base64.b64encode(HOSTILE[name][0]).decode())


def test_an_image_over_max_pixels_is_refused_before_decoding() -> None:
    assert MAX_INPUT_PIXELS == 4096 * 4096
    assert "64x64" in str(refused(encoded(gradient(64, 64)), max_pixels=1000))
    read_image(encoded(gradient(64, 64)), FIELD, max_pixels=64 * 64)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_s_bomb_warning_as_an_error_is_an_input_error() -> None:
    # 10000 x 10000 is over Image.MAX_IMAGE_PIXELS (Pillow warns) but within these bounds.
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < 10_000**2
    assert "decompression bomb" in str(refused(hand_png(10_000, 10_000), max_pixels=200_000_000))


def test_the_pixel_bound_holds_whatever_pillow_s_own_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # an application may switch Pillow's off
    assert "100000x100000" in str(refused(hand_png(100_000, 100_000)))


def test_more_than_20_mib_is_refused_before_decoding() -> None:
    assert "too large" in str(refused(b"\0" * (20 * 1024 * 1024 + 1)))
    assert "too large" in str(refused("A" * (28 * 1024 * 1024)))
    assert "too large" in str(refused("AAAA\n" * (6 * 1024 * 1024)))


# Pillow's notes on damaged TIFF tags, and its bomb warning on damaged headers (refused all the same)
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
def test_random_damage_to_valid_files_never_escapes_as_another_exception() -> None:
    """A small fuzz: flipped, dropped and inserted bytes in every accepted format."""
    picture = gradient(24, 16)
    kinds = [("PNG", "RGB"), ("PNG", "RGBA"), ("JPEG", "RGB"), ("GIF", "P"), ("WEBP", "RGB"), ("BMP", "RGB")]
    sources = [encoded(picture.convert(mode), fmt) for fmt, mode in kinds]
    sources += [encoded(picture, "TIFF"), encoded(picture, "TIFF", compression="tiff_lzw")]
    rng = random.Random(1234)
    for source in sources:
        for _ in range(60):
            data = bytearray(source)
            for _ in range(rng.randint(1, 4)):
                where = rng.randrange(len(data))
                action = rng.random()
                if action < 0.5:
                    data[where] = rng.randrange(256)
                elif action < 0.75:
                    del data[where : where + rng.randint(1, 16)]
                else:
                    data[where:where] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            try:
                image = read_image(bytes(data), FIELD)
            except ImageInputError as error:
                assert str(error).startswith(f"{FIELD}: ")
            else:
                assert image.mode in ("RGB", "RGBA", "L", "LA")


# Accepted input -----------------------------------------------------------------------------------


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


def at(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    """One pixel's channels (getpixel's type is a union of every mode's)."""
    return tuple(int(v) for v in np.asarray(image)[y, x].reshape(-1))


def test_every_way_of_writing_base64_gives_the_same_pixels() -> None:
    source = gradient()
    data = encoded(source)
    standard = base64.b64encode(data).decode()
    urlsafe = base64.urlsafe_b64encode(data).decode()
    assert set("+/") & set(standard) and set("-_") & set(urlsafe)  # the alphabets really differ here
    ways: list[str | bytes] = [
        data,
        standard,
        base64.encodebytes(data).decode(),  # Azure's samples: a newline every 76 characters
        base64.encodebytes(data).decode().replace("\n", "\r\n"),
        f"data:image/png;base64,{standard}",
        f"DATA:image/png;name=cat.png;base64,{standard}",
        urlsafe,
        urlsafe.rstrip("="),
        standard.rstrip("="),
        f"  {standard}\n",
    ]
    for way in ways:
        image = read_image(way, FIELD)
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(source))


def test_a_cmyk_jpeg_becomes_rgb_close_to_its_source() -> None:
    source = gradient(64, 64)
    image = read_image(encoded(source.convert("CMYK"), "JPEG", quality=95), FIELD)
    assert image.mode == "RGB"
    assert np.abs(pixels(image) - pixels(source)).mean() < 4


def test_a_16_bit_grayscale_png_keeps_its_scale() -> None:
    values = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    image = read_image(encoded(source), FIELD)
    assert image.mode == "L"
    assert np.asarray(image).tolist() == [[0, 0, 1, 128, 255]]


def test_big_endian_16_bit_tiff_and_32_bit_modes() -> None:
    values = np.array([[0, 32768, 65535]], dtype=">u2")
    assert np.asarray(read_image(encoded(Image.fromarray(values), "TIFF"), FIELD)).tolist() == [[0, 128, 255]]
    as_int = Image.fromarray(np.array([[-5, 32768, 65535, 1 << 20]], dtype=np.int32))
    assert as_int.mode == "I"
    assert np.asarray(normalise_mode(as_int, FIELD)).tolist() == [[0, 128, 255, 255]]
    as_float = Image.fromarray(np.array([[-3.0, 127.6, 300.0, np.nan]], dtype=np.float32))
    assert np.asarray(normalise_mode(as_float, FIELD)).tolist() == [[0, 128, 255, 0]]


def test_a_palette_image_with_transparency_becomes_rgba() -> None:
    source = Image.new("P", (4, 2), 1)
    source.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    source.putpixel((0, 0), 2)
    image = read_image(encoded(source, transparency=2), FIELD)
    assert image.mode == "RGBA"
    assert at(image, 0, 0)[3] == 0 and at(image, 1, 0) == (255, 0, 0, 255)
    opaque = read_image(encoded(source), FIELD)
    assert opaque.mode == "RGB" and at(opaque, 0, 0) == (0, 0, 255)


@pytest.mark.parametrize(
    ("mode", "fmt", "expected"),
    [
        ("1", "PNG", "L"),
        ("L", "PNG", "L"),
        ("LA", "PNG", "LA"),
        ("RGBA", "PNG", "RGBA"),
        ("RGBA", "WEBP", "RGBA"),
        ("RGB", "BMP", "RGB"),
        ("P", "GIF", "RGB"),
        ("CMYK", "TIFF", "RGB"),
        ("RGB", "TIFF", "RGB"),
        ("L", "JPEG", "L"),
    ],
)
def test_modes_are_normalised(mode: str, fmt: str, expected: str) -> None:
    source = gradient(16, 8, mode)
    if "A" in mode:
        source.putalpha(Image.linear_gradient("L").resize((16, 8)))  # really transparent in places
    image = read_image(encoded(source, fmt), FIELD)
    assert image.mode == expected and image.size == (16, 8)


def test_normalise_mode_covers_the_rarer_modes_and_refuses_the_rest() -> None:
    for mode, expected in [
        ("PA", "RGBA"),
        ("RGBX", "RGB"),
        ("RGBa", "RGBA"),
        ("YCbCr", "RGB"),
        ("HSV", "RGB"),
    ]:
        assert normalise_mode(Image.new(mode, (2, 2)), FIELD).mode == expected
    lab = Image.new("LAB", (1, 1), (255, 128, 128))
    assert all(channel > 245 for channel in at(normalise_mode(lab, FIELD), 0, 0))  # white
    with pytest.raises(ImageInputError, match=r"^init_images\[0\]: .*pixel format"):
        normalise_mode(Image.new("La", (2, 2)), FIELD)


def test_the_exif_orientation_is_applied() -> None:
    source = Image.new("RGB", (40, 16), (255, 0, 0))
    source.paste((0, 0, 255), (20, 0, 40, 16))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to show
    image = read_image(encoded(source, "JPEG", quality=95, exif=exif.tobytes()), FIELD)
    assert image.size == (16, 40)
    upright = source.transpose(Image.Transpose.ROTATE_270)
    assert np.abs(pixels(image) - pixels(upright)).mean() < 4
    assert at(image, 8, 4)[0] > 200 and at(image, 8, 36)[2] > 200  # red on top
    assert image.getexif().get(0x0112, 1) == 1


def test_an_mpo_is_read_as_its_first_picture() -> None:
    first, second = Image.new("RGB", (16, 16), (0, 200, 0)), Image.new("RGB", (16, 16), (200, 0, 0))
    image = read_image(encoded(first, "MPO", save_all=True, append_images=[second]), FIELD)
    assert image.mode == "RGB" and at(image, 8, 8)[1] > 180


def test_the_image_is_detached_from_its_file() -> None:
    image = read_image(encoded(gradient()), FIELD)
    assert image.readonly == 0 and np.asarray(image).shape == (32, 48, 3)


# to_rgb, to_mask ----------------------------------------------------------------------------------


def test_to_rgb_at_the_same_size_is_the_pixels_themselves() -> None:
    source = gradient(48, 32, "RGBA")
    array = to_rgb(source, (32, 48))
    assert array.dtype == np.uint8 and array.shape == (32, 48, 3) and array.flags.c_contiguous
    assert array.flags.writeable and array.flags.owndata
    assert np.array_equal(array, np.asarray(source.convert("RGB")))
    with pytest.raises(ValueError):
        to_rgb(source, (0, 8))


def test_to_rgb_and_to_mask_equal_diffusers_on_a_resize() -> None:
    image_processor = pytest.importorskip("diffusers.image_processor")
    source = gradient(97, 61)
    size = (48, 64)  # height, width; multiples of 8, as diffusers rounds to them
    ours = to_rgb(source, size).astype(np.int64)
    theirs = image_processor.VaeImageProcessor(do_normalize=False).preprocess(source, height=48, width=64)
    theirs = np.rint(theirs[0].permute(1, 2, 0).numpy() * 255).astype(np.int64)
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1

    gray = gradient(97, 61, "L").convert("RGB")  # a mask image as clients send it: RGB, R = G = B
    mask_processor = image_processor.VaeImageProcessor(
        do_normalize=False, do_binarize=False, do_convert_grayscale=True
    )
    theirs_mask = mask_processor.preprocess(gray, height=48, width=64)
    theirs_mask = np.rint(theirs_mask[0, 0].numpy() * 255).astype(np.int64)
    ours_mask = to_mask(gray, size, field="mask").astype(np.int64)
    assert ours_mask.shape == (48, 64) and np.abs(ours_mask - theirs_mask).max() <= 1


def test_to_mask_from_luminance_from_alpha_and_inverted() -> None:
    source = Image.new("RGBA", (8, 4), (255, 255, 255, 255))
    source.paste((0, 0, 0, 0), (0, 0, 4, 4))  # left half: black and transparent
    luminance = to_mask(source, (4, 8), field="mask")
    assert luminance.dtype == np.uint8 and luminance.shape == (4, 8)
    assert luminance[:, :4].max() == 0 and luminance[:, 4:].min() == 255
    from_alpha = to_mask(source, (4, 8), field="mask", from_alpha=True)
    assert from_alpha[:, :4].min() == 255 and from_alpha[:, 4:].max() == 0  # transparent = repaint
    assert np.array_equal(to_mask(source, (4, 8), field="mask", invert=True), 255 - luminance)
    both = to_mask(source, (4, 8), field="mask", from_alpha=True, invert=True)
    assert np.array_equal(both, luminance)
    resized = to_mask(source.convert("LA"), (8, 16), field="mask", from_alpha=True)
    assert resized.shape == (8, 16) and resized[:, 0].min() == 255 and resized[:, -1].max() == 0


def test_a_mask_from_alpha_needs_an_alpha_channel() -> None:
    with pytest.raises(ImageInputError, match=r"^mask: .*transparent.*alpha channel") as caught:
        to_mask(Image.new("RGB", (4, 4)), (4, 4), field="mask", from_alpha=True)
    assert caught.value.field == "mask"


# output_size --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_size", "height", "width", "expected"),
    [
        ((1000, 500), 512, 768, (512, 768)),  # both given
        ((1000, 500), None, 512, (256, 512)),  # width given: height from the aspect
        ((1000, 500), 512, None, (512, 1024)),
        ((1000, 500), 768, None, (768, 1024)),  # 1536 clamped
        ((3000, 100), None, 512, (128, 512)),  # 17 clamped up
        ((999, 1000), None, 700, (696, 696)),  # 699.3 rounded down to 8
        ((640, 480), None, None, (480, 640)),  # its own size
        ((3000, 2000), None, None, (680, 1024)),  # scaled down: 1024 x 682.67
        ((2000, 3000), None, None, (1024, 680)),
        ((100, 50), None, None, (128, 256)),  # scaled up to the minimum
        ((4000, 10), None, None, (128, 1024)),  # can't keep both: clamped
        ((1001, 999), None, None, (992, 1000)),
        ((1024, 1024), None, None, (1024, 1024)),
        ((1, 1), None, None, (128, 128)),
    ],
)
def test_output_size(image_size: Any, height: int | None, width: int | None, expected: Any) -> None:
    assert output_size(Image.new("L", image_size), height, width) == expected


def test_output_size_is_always_a_multiple_within_the_bounds() -> None:
    rng = random.Random(7)
    for _ in range(500):
        image = Image.new("1", (rng.randint(1, 5000), rng.randint(1, 5000)))
        height = rng.choice([None, rng.randint(1, 3000)])
        width = rng.choice([None, rng.randint(1, 3000)])
        multiple = rng.choice([8, 64])
        h, w = output_size(image, height, width, min_side=64, max_side=2048, multiple=multiple)
        assert h % multiple == 0 and w % multiple == 0 and 64 <= h <= 2048 and 64 <= w <= 2048
    with pytest.raises(ValueError):  # no multiple of 8 in the bounds
        output_size(Image.new("L", (8, 8)), None, None, min_side=130, max_side=135, multiple=8)
