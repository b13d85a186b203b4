"""Render the emulator's output images: the exact documented size, the prompt drawn on them."""

from __future__ import annotations

import hashlib
import io
import textwrap
from typing import Literal

from PIL import Image, ImageDraw, ImageFont

EncodedAs = Literal["png", "jpeg"]


def render_image(
    prompt: str,
    task_id: str,
    size: tuple[int, int],
    *,
    encode_as: EncodedAs = "png",
    noise: bool = False,
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

    Returns:
        The encoded image.
    """
    width, height = size
    seed = hashlib.sha256(prompt.encode()).digest()
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
    buffer = io.BytesIO()
    if encode_as == "jpeg":
        image.save(buffer, "JPEG", quality=90)
    else:
        # Level 1: rendering speed matters more than a few percent of size in an emulator.
        image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()
