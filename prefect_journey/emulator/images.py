"""Render the emulator's output images: the exact documented size, the prompt drawn on them."""

from __future__ import annotations

import hashlib
import io
import textwrap
from typing import Literal

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

EncodedAs = Literal["png", "jpeg"]


def render_image(
    prompt: str,
    task_id: str,
    size: tuple[int, int],
    *,
    encode_as: EncodedAs = "png",
    noise: bool = False,
    plain: bool = False,
) -> bytes:
    """An image of ``size`` whose colours come from the prompt and which shows the prompt.

    The colours are derived from the prompt's SHA-256, so the same prompt gives the same
    gradient; the text is the prompt (up to 12 wrapped lines) and a line with the task id
    and the size.

    Args:
        prompt: The prompt, drawn on the image.
        task_id: The task's id, drawn on the image.
        size: The (width, height) in pixels.
        encode_as: ``"png"`` (the default, compression level 1 for speed) or ``"jpeg"``
            (quality 90).
        noise: Adds grain so the PNG is as large as a real photo-like output (the benchmark
            uses it); without it images compress to a few hundred KB and render fast. False
            by default.
        plain: One flat colour (the prompt's) and no text, unless ``noise``: the same size
            and format for a twentieth of the CPU. False by default.

    Returns:
        The encoded image.
    """
    width, height = size
    seed = hashlib.sha256(prompt.encode()).digest()
    if plain and not noise:
        # A one-colour palette: a PNG of a few hundred bytes, encoded and decoded in a few ms;
        # the task id in its metadata keeps each task's bytes its own, as the drawn text does.
        flat = Image.new("P", size, 0)
        flat.putpalette(seed[:3])
        return _encoded(flat, encode_as, note=f"task {task_id}")
    gradient = Image.linear_gradient("L").resize((width, height))
    image = Image.merge(
        "RGB",
        [gradient.point(lambda v, c=c: c // 2 + v // 2) for c in seed[:3]],
    )
    if noise:
        grain = Image.effect_noise((width, height), 64).convert("RGB")
        image = Image.blend(image, grain, 0.35)
    draw = ImageDraw.Draw(image)
    font_size = max(16, width // 28)
    font = ImageFont.load_default(size=font_size)
    lines = textwrap.wrap(prompt, width=max(10, int(width / (font_size * 0.6))))[:12]
    lines.append(f"task {task_id}  {width}x{height}")
    margin = width // 20
    draw.multiline_text(
        (margin, margin),
        "\n".join(lines),
        font=font,
        fill="white",
        stroke_width=max(1, font_size // 12),
        stroke_fill="black",
        spacing=font_size // 3,
    )
    return _encoded(image, encode_as)


def _encoded(image: Image.Image, encode_as: EncodedAs, *, note: str = "") -> bytes:
    buffer = io.BytesIO()
    if encode_as == "jpeg":
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        rgb.save(buffer, "JPEG", quality=90, comment=note)  # an empty note writes none
    else:
        info = PngImagePlugin.PngInfo()
        if note:
            info.add_text("Comment", note)
        # Level 1: rendering speed matters more than a few percent of size in an emulator.
        image.save(buffer, "PNG", compress_level=1, pnginfo=info)
    return buffer.getvalue()
