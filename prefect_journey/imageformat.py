"""Recognise and verify PNG, JPEG and WebP bytes while they stream past.

The API sometimes serves JPEG bytes under a ``.png`` URL, so the format comes from the
content, never the name. :class:`ImageVerifier` is fed the download chunk by chunk and, at
the end, either returns the format and pixel size or raises: a PNG must have every chunk CRC
right and end with ``IEND``; a JPEG must start with SOI and end with EOI; a WebP's RIFF size
must match the bytes received. That catches truncation and most corruption without decoding
the image (no Pillow needed) and without holding more than a small header in memory.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Literal

ImageFormatName = Literal["png", "jpeg", "webp"]

EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
# A JPEG's frame header (with the size) follows its EXIF/ICC segments; they rarely exceed
# this, and reading further only to find a size is not worth the memory.
MAX_HEADER_BYTES = 512 * 1024


class ImageFormatError(ValueError):
    """The bytes are not a complete, well-formed PNG, JPEG or WebP image."""


@dataclass(frozen=True)
class ImageInfo:
    """What :class:`ImageVerifier` read from an image: its format and pixel size.

    Attributes:
        format: ``"png"``, ``"jpeg"`` or ``"webp"``, from the bytes.
        width: The width in pixels, from the header.
        height: The height in pixels, from the header.
    """

    format: ImageFormatName
    width: int
    height: int

    @property
    def extension(self) -> str:
        """The format's file extension, without the dot: ``png``, ``jpg`` or ``webp``."""
        return EXTENSIONS[self.format]

    @property
    def content_type(self) -> str:
        """The format's media type: ``image/png``, ``image/jpeg`` or ``image/webp``."""
        return CONTENT_TYPES[self.format]


def detect_format(head: bytes) -> ImageFormatName | None:
    """The format named by the first bytes, or None.

    Args:
        head: The first bytes of the data; 12 are enough for any of the three formats.

    Returns:
        ``"png"``, ``"jpeg"`` or ``"webp"``; None when the bytes name none of them or are
        too few to tell.
    """
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(JPEG_SOI):
        return "jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def _png_size(head: bytes) -> tuple[int, int] | None:
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            raise ImageFormatError("JPEG segment marker expected")
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", head[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(head):
                return None
            height, width = struct.unpack(">HH", head[pos + 5 : pos + 9])
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            raise ImageFormatError("JPEG has no frame header before its scan data")
        pos += 2 + length
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    if len(head) < 30:
        return None
    kind = head[12:16]
    if kind == b"VP8 ":
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if kind == b"VP8L":
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return width, height
    raise ImageFormatError(f"unknown WebP chunk {kind!r}")


_SIZE_READERS = {"png": _png_size, "jpeg": _jpeg_size, "webp": _webp_size}


class _PngChunkChecker:
    """Walks PNG chunks incrementally, checking each CRC; remembers whether IEND was seen."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._state: Literal["signature", "header", "data", "crc"] = "signature"
        self._remaining = 0  # bytes of the current chunk's data still to come
        self._crc = 0
        self._chunk_type = b""
        self.ended = False

    def feed(self, data: bytes) -> None:
        # Chunk data is checked straight from the caller's bytes (a memoryview, no copy);
        # only the few bytes of signatures, headers and CRCs are buffered.
        view = memoryview(data)
        while view:
            if self.ended:
                raise ImageFormatError("PNG has data after its IEND chunk")
            if self._state == "data":
                part = view[: self._remaining]
                self._crc = zlib.crc32(part, self._crc)
                self._remaining -= len(part)
                view = view[len(part) :]
                if self._remaining == 0:
                    self._state = "crc"
                continue
            needed = {"signature": 8, "header": 8, "crc": 4}[self._state]
            missing = needed - len(self._buffer)
            self._buffer += view[:missing]
            view = view[missing:]
            if len(self._buffer) < needed:
                return
            field = bytes(self._buffer)
            self._buffer.clear()
            self._take(field)

    def _take(self, field: bytes) -> None:
        if self._state == "signature":
            self._state = "header"
        elif self._state == "header":
            length, self._chunk_type = struct.unpack(">I4s", field)
            if length > 2**31 - 1:
                raise ImageFormatError("PNG chunk length out of range")
            self._crc = zlib.crc32(self._chunk_type)
            self._remaining = length
            self._state = "data" if length else "crc"
        else:
            (expected,) = struct.unpack(">I", field)
            if expected != self._crc & 0xFFFFFFFF:
                raise ImageFormatError(f"PNG chunk {self._chunk_type!r} has a bad CRC")
            self.ended = self._chunk_type == b"IEND"
            self._state = "header"


class ImageVerifier:
    """Feed a download with :meth:`feed`; :meth:`finish` returns its :class:`ImageInfo`.

    The checks are those of the module docstring: PNG chunk CRCs and ``IEND``, JPEG start
    and end markers, WebP RIFF length; nothing is decoded. Whatever the image size, memory
    use stays small: only the bytes before the pixel size is found are kept, at most
    :data:`MAX_HEADER_BYTES` (or the first chunk fed, when that is longer).

    Attributes:
        total: The number of bytes fed so far.

    Example:
        ```python
        from prefect_journey.imageformat import ImageVerifier

        verifier = ImageVerifier()
        with open("image.png", "rb") as file:
            while chunk := file.read(1024 * 1024):
                verifier.feed(chunk)
        info = verifier.finish()
        print(info.format, info.width, info.height)
        ```
    """

    def __init__(self) -> None:
        self._head = b""
        self._format: ImageFormatName | None = None
        self._size: tuple[int, int] | None = None
        self._png = _PngChunkChecker()
        self._tail = b""
        self._riff_length: int | None = None
        self.total = 0

    def feed(self, data: bytes) -> None:
        """Check the next bytes of the image, in order.

        Args:
            data: The next chunk; an empty one is ignored.

        Raises:
            ImageFormatError: The bytes so far cannot be a PNG, JPEG or WebP image: an
                unknown signature, a bad PNG chunk CRC or data after ``IEND``, a malformed
                JPEG segment, an unknown WebP chunk, or no pixel size within the first
                :data:`MAX_HEADER_BYTES`.
        """
        if not data:
            return
        self.total += len(data)
        self._tail = (self._tail + data[-2:])[-2:]  # not a copy of the whole chunk
        if self._format is None:
            self._head += data
            if len(self._head) < 12:
                return
            self._format = detect_format(self._head)
            if self._format is None:
                raise ImageFormatError(
                    f"not a PNG, JPEG or WebP image (starts with {self._head[:8]!r})"
                )
            if self._format == "webp":
                self._riff_length = int.from_bytes(self._head[4:8], "little") + 8
            data = self._head  # every byte so far still has to pass the checks below
        elif self._size is None:
            self._head += data[: MAX_HEADER_BYTES + 1 - len(self._head)]
        if self._size is None:
            self._read_size()
        if self._format == "png":
            self._png.feed(data)

    def _read_size(self) -> None:
        assert self._format is not None
        self._size = _SIZE_READERS[self._format](self._head)
        if self._size is None and len(self._head) > MAX_HEADER_BYTES:
            raise ImageFormatError(f"no {self._format} size in the first {MAX_HEADER_BYTES} bytes")
        if self._size is not None:
            self._head = b""

    def finish(self) -> ImageInfo:
        """Check the image is complete; raise :class:`ImageFormatError` if not.

        Returns:
            The image's format and pixel size.

        Raises:
            ImageFormatError: The bytes are too few to be an image, end before the pixel
                size, lack a PNG's ``IEND`` or a JPEG's end marker, do not match a WebP's
                RIFF length, or claim a zero size.
        """
        if self._format is None:
            raise ImageFormatError(f"too short to be an image ({self.total} bytes)")
        if self._size is None:
            raise ImageFormatError(f"{self._format} image ends before its size is known")
        if self._format == "png" and not self._png.ended:
            raise ImageFormatError("PNG is truncated (no IEND chunk)")
        if self._format == "jpeg" and self._tail != JPEG_EOI:
            raise ImageFormatError("JPEG is truncated (no end-of-image marker)")
        if self._format == "webp":
            self._check_riff_length()
        width, height = self._size
        if width <= 0 or height <= 0:
            raise ImageFormatError(f"{self._format} image claims a size of {width}x{height}")
        return ImageInfo(self._format, width, height)

    def _check_riff_length(self) -> None:
        if self._riff_length != self.total:
            raise ImageFormatError(
                f"WebP is {self.total} bytes but its header says {self._riff_length}"
            )


def inspect_bytes(data: bytes) -> ImageInfo:
    """Verify a whole image held in memory (for tests and small files).

    Args:
        data: The image's bytes.

    Returns:
        The image's format and pixel size.

    Raises:
        ImageFormatError: The bytes are not a complete, well-formed PNG, JPEG or WebP image.

    Example:
        ```python
        from pathlib import Path

        from prefect_journey.imageformat import inspect_bytes

        info = inspect_bytes(Path("image.png").read_bytes())
        print(info.format, info.width, info.height, info.extension)
        ```
    """
    verifier = ImageVerifier()
    verifier.feed(data)
    return verifier.finish()
