"""AUTOMATIC1111's img2img preparation of an image and its mask, and the paste back after.

A1111's clients (webuiapi, the Krita and GIMP plugins) send an image, a mask and the options of its
img2img tab; what those options mean is A1111's, not diffusers': how the image is fitted to the
asked size (``resize_mode``), a blurred mask edge (``mask_blur``), what the masked area starts from
(``inpainting_fill``), and "inpaint only masked" (``inpaint_full_res``): the masked area is cut out
with ``inpaint_full_res_padding`` pixels around it, drawn at the asked size, and pasted back into
the whole image. After inpainting, the pixels outside the mask are the client's own again (A1111's
overlay). Pure PIL: the functions take and give images, so each is tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageChops, ImageFilter, ImageOps

RESIZE_STRETCH, RESIZE_CROP, RESIZE_FILL, RESIZE_LATENT = 0, 1, 2, 3
FILL_BLUR, FILL_ORIGINAL = 0, 1
# The blur radii (and how often each is laid on) that spread the kept colours into the masked area.
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


@dataclass(frozen=True)
class Prepared:
    """What the engine gets (the image and mask at the drawn size) and what the answer needs: the
    whole image to paste into (``paste_to``: left, top, width, height of the cut-out area) and the
    client's pixels to lay back over the kept region."""

    image: Image.Image
    mask: Image.Image | None
    base: Image.Image | None = None
    paste_to: tuple[int, int, int, int] | None = None
    overlay: Image.Image | None = None


def resize(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """The image at width x height as A1111's resize modes make it: stretched (0, and 3, whose
    latent upscale is a stretch of the image here), cropped to the aspect then scaled (1), or
    scaled to fit with the borders filled from the image's own edges (2)."""
    if mode == RESIZE_CROP:
        scale = max(width / image.width, height / image.height)
        return _scaled(image, scale).crop(_centred(image, scale, width, height))
    if mode == RESIZE_FILL:
        scale = min(width / image.width, height / image.height)
        inner = _scaled(image, scale)
        canvas = inner.resize((width, height), Image.Resampling.LANCZOS)  # the edges, stretched
        canvas.paste(inner, ((width - inner.width) // 2, (height - inner.height) // 2))
        return canvas
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _scaled(image: Image.Image, scale: float) -> Image.Image:
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _centred(image: Image.Image, scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    scaled_w, scaled_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    left, top = (scaled_w - width) // 2, (scaled_h - height) // 2
    return left, top, left + width, top + height


def binary_mask(mask: Image.Image, *, invert: bool, blur: int) -> Image.Image:
    """A1111's mask: the alpha channel when it has one that is not all opaque (painted strokes on a
    transparent layer), else the grey level; white (over 127) repaints; inverted on request; the
    edge blurred by ``blur`` pixels."""
    if mask.mode in ("RGBA", "LA") and mask.getchannel("A").getextrema() != (255, 255):
        grey = mask.getchannel("A")
    else:
        grey = mask.convert("L")
    binary = grey.point(lambda level: 255 if level > 127 else 0)
    if invert:
        binary = ImageOps.invert(binary)
    return binary.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else binary


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The masked area's box with ``padding`` pixels around it, grown to the drawn size's aspect
    ratio, inside the image (left, top, right, bottom)."""
    box = mask.point(lambda level: 255 if level > 0 else 0).getbbox() or (0, 0, mask.width, mask.height)
    left, top = max(box[0] - padding, 0), max(box[1] - padding, 0)
    right, bottom = min(box[2] + padding, mask.width), min(box[3] + padding, mask.height)
    # Grow the shorter way round until the box has the drawn image's aspect ratio.
    box_w, box_h = right - left, bottom - top
    if box_w / box_h < width / height:
        left, right = _grown(left, right, round(box_h * width / height), mask.width)
    else:
        top, bottom = _grown(top, bottom, round(box_w * height / width), mask.height)
    return left, top, right, bottom


def _grown(start: int, end: int, wanted: int, limit: int) -> tuple[int, int]:
    """[start, end) widened about its centre to ``wanted`` (at most ``limit``), kept in [0, limit)."""
    wanted = min(wanted, limit)
    start -= (wanted - (end - start)) // 2
    start = min(max(start, 0), limit - wanted)
    return start, start + wanted


def filled(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked area painted over with the kept colours blurred into it (A1111's "fill"), so that
    the area starts from the colours around it rather than from what was there."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    result = Image.new("RGBA", image.size)
    for radius, repeats in _FILL_PASSES:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(layer)
    return result.convert("RGB")


def prepare(
    image: Image.Image,
    mask: Image.Image | None,
    *,
    width: int,
    height: int,
    resize_mode: int,
    blur: int,
    fill: int,
    invert: bool,
    only_masked: bool,
    padding: int,
) -> Prepared:
    """An init image and its mask as A1111's img2img prepares them for width x height."""
    image = image.convert("RGB")  # A1111 flattens onto its background; an opaque image is itself
    if mask is None:
        return Prepared(resize(image, resize_mode, width, height), None)
    soft = binary_mask(mask, invert=invert, blur=blur)
    if only_masked:
        region = crop_region(soft, padding, width, height)
        overlay = _overlay(image, soft)
        cut = resize(image.crop(region), RESIZE_FILL, width, height)
        cut_mask = resize(soft.crop(region), RESIZE_FILL, width, height)
        start = filled(cut, cut_mask) if fill != FILL_ORIGINAL else cut
        paste_to = (region[0], region[1], region[2] - region[0], region[3] - region[1])
        return Prepared(start, cut_mask, base=image, paste_to=paste_to, overlay=overlay)
    fitted, fitted_mask = resize(image, resize_mode, width, height), resize(soft, resize_mode, width, height)
    # A1111 lays back the client's pixels where the mask is under half: its grey levels doubled.
    overlay = _overlay(fitted, fitted_mask.point(lambda level: min(255, level * 2)))
    start = filled(fitted, fitted_mask) if fill != FILL_ORIGINAL else fitted
    return Prepared(start, fitted_mask, overlay=overlay)


def _overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The client's pixels where the mask keeps them, transparent where it repaints."""
    layer = image.convert("RGBA")
    layer.putalpha(ImageChops.invert(mask.convert("L")))
    return layer


def finish(drawn: Image.Image, prepared: Prepared) -> Image.Image:
    """A drawn image as A1111 answers it: pasted back into the whole image (inpaint only masked),
    with the kept pixels laid over it."""
    if prepared.base is not None and prepared.paste_to is not None:
        left, top, width, height = prepared.paste_to
        whole = prepared.base.convert("RGBA")
        whole.paste(drawn.resize((width, height), Image.Resampling.LANCZOS).convert("RGBA"), (left, top))
        drawn = whole
    if prepared.overlay is None:
        return drawn.convert("RGB")
    result = drawn.convert("RGBA")
    result.alpha_composite(prepared.overlay)
    return result.convert("RGB")
