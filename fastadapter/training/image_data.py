"""Image-instruction data: examples that carry an image, packed with text-only examples into one row.

A generic image-instruction file is an Alpaca-format JSON / JSONL file whose rows may add ``"image"``: the path
of an image file (relative to the data file's folder, or absolute). Rows without ``"image"`` (or with ``null``)
are text-only and train the plain prompts; both kinds pack together. A row whose image file is missing or
unreadable is a bad row: reported by its index and skipped, or fatal (``on_bad_row="error"``), as a malformed
text row.

:func:`collate_images` packs :class:`ImageExample` rows as :func:`fastadapter.training.packing.collate_packed`
does and adds the row's images (``pixel_values [M, 3, H, W]``, by the vision tower's processor) and which
sequence has which (``image_index [N]``, -1 for none), which :class:`fastadapter.vision.MultimodalLlama` takes.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .data import ON_BAD_ROW_CHOICES, DataError, DataReport, Example, load_rows, tokenize_rows
from .packing import PackedBatch, collate_packed


@dataclass(frozen=True)
class ImageExample(Example):
    """An :class:`Example` with the path of its image (None: text only) and the id of its source row
    (``key``: a ScienceQA pid, or the row index as text)."""

    image: Optional[str] = field(default=None, compare=False)
    key: Optional[str] = field(default=None, compare=False)


@dataclass
class ImagePackedBatch(PackedBatch):
    """A :class:`PackedBatch` plus its images.

    Attributes:
        pixel_values: ``[M, 3, H, W]`` fp32, the distinct images of the row (M may be 0).
        image_index: int64 ``[N]``: the row of ``pixel_values`` of packed sequence ``n``, -1 for none.
    """

    pixel_values: Optional[torch.Tensor] = None
    image_index: Optional[torch.Tensor] = None

    def to(self, device) -> "ImagePackedBatch":
        base = super().to(device)
        return ImagePackedBatch(base.tokens, base.labels, base.cu_seqlens, base.max_seqlen,
                                None if self.pixel_values is None else self.pixel_values.to(device),
                                None if self.image_index is None else self.image_index.to(device))

    def extra_inputs(self) -> dict:
        """The keyword arguments :class:`~fastadapter.vision.MultimodalLlama` takes besides the packed tokens."""
        return {"pixel_values": self.pixel_values, "image_index": self.image_index}


def open_image(path: str):
    """The image file at ``path`` as an RGB PIL image; ``DataError`` naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from exc


class PixelCache:
    """``path → pixel_values [3, H, W]``: images read and preprocessed once, the most recent kept up to
    ``max_bytes`` (a frozen tower's input never changes, and decoding plus resizing costs more than a small
    model's step).

    Args:
        preprocess: ``list of PIL images → [M, 3, H, W]`` (:meth:`fastadapter.vision.VisionTower.preprocess`).
        max_bytes: memory for cached pixels (0: no cache).
    """

    def __init__(self, preprocess: Callable, max_bytes: int = 1 << 30):
        self.preprocess, self.max_bytes = preprocess, max_bytes
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def __call__(self, paths: Sequence[str]) -> torch.Tensor:
        """``[len(paths), 3, H, W]`` for the image files ``paths``."""
        missing = [p for p in dict.fromkeys(paths) if p not in self._cache]
        fresh = dict(zip(missing, self.preprocess([open_image(p) for p in missing]))) if missing else {}
        out = torch.stack([self._cache[p] if p in self._cache else fresh[p] for p in paths])
        for path, pixels in fresh.items():
            size = pixels.numel() * pixels.element_size()
            if size > self.max_bytes:
                continue
            self._cache[path] = pixels
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._cache.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()
        for path in paths:
            if path in self._cache:
                self._cache.move_to_end(path)
        return out


def collate_images(examples: Sequence[Example], pixels: Callable[[Sequence[str]], torch.Tensor]) -> ImagePackedBatch:
    """Pack ``examples`` (text-only :class:`Example` and :class:`ImageExample` mixed) into one row with their
    images; an image shared by several examples is computed once. ``pixels``: paths → ``[M, 3, H, W]``
    (a :class:`PixelCache`)."""
    base = collate_packed(examples)
    paths = list(dict.fromkeys(e.image for e in examples if getattr(e, "image", None)))
    where = {path: i for i, path in enumerate(paths)}
    index = torch.tensor([where.get(getattr(e, "image", None), -1) for e in examples], dtype=torch.int64)
    values = pixels(paths) if paths else None
    return ImagePackedBatch(base.tokens, base.labels, base.cu_seqlens, base.max_seqlen, values, index)


def images_digest(examples: Sequence[Example]) -> str:
    """sha256 (hex) of the image file names of ``examples`` in order (the last two path parts, so that a moved
    data folder matches), for the resume fingerprint."""
    digest = hashlib.sha256()
    for example in examples:
        image = getattr(example, "image", None)
        digest.update(("-" if image is None else "/".join(os.path.normpath(image).split(os.sep)[-3:])).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _bad_row(path: str, where: str, problem: str, on_bad_row: str, report: DataReport, index: int) -> None:
    if on_bad_row == "error":
        raise DataError.naming("{path}: {where} is malformed: {problem} (pass {on_bad_row} skip to skip it)",
                               path=path, where=where, problem=problem)
    report.bad_rows.append((index, problem))
    warnings.warn(f"{path}: skipping malformed {where}: {problem}", stacklevel=3)


def load_image_instruction_examples(path: str | os.PathLike, tokenizer, max_seq_len: int, *,
                                    on_bad_row: str = "skip") -> tuple[list[ImageExample], DataReport]:
    """Alpaca rows with an optional ``"image"`` path → :class:`ImageExample` (``image`` absolute, or None).

    Raises:
        FileNotFoundError: no data file.
        DataError: an unreadable file, or (``on_bad_row="error"``) a malformed row or a missing image, named by
            its row index.
    """
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {on_bad_row!r}")
    path = os.fspath(path)
    report = DataReport()
    rows = load_rows(path, on_bad_row=on_bad_row, report=report)
    folder = os.path.dirname(os.path.abspath(path))
    kept, numbers, images = [], [], []
    for row, number in zip(rows, report.kept_rows):
        image = row.get("image")
        if image is not None:
            if not isinstance(image, str) or not image:
                _bad_row(path, f"row {number}", f"'image' must be a path string, got {image!r}", on_bad_row,
                         report, number)
                continue
            image = image if os.path.isabs(image) else os.path.join(folder, image)
            if not os.path.isfile(image):
                _bad_row(path, f"row {number}", f"image file not found: {image}", on_bad_row, report, number)
                continue
        kept.append(row)
        numbers.append(number)
        images.append(image)
    report.kept_rows = numbers
    examples = tokenize_rows(kept, tokenizer, max_seq_len, report, row_numbers=list(range(len(kept))))
    out = [ImageExample(e.tokens, e.labels, e.truncated, row=numbers[e.row], image=images[e.row],
                        key=str(numbers[e.row])) for e in examples]
    if not out:
        raise DataError.naming("{path}: no example left after truncation to {length} tokens; raise {max_seq_len}",
                               path=path, length=max_seq_len)
    return out, report


def has_images(path: str | os.PathLike) -> bool:
    """Whether the data at ``path`` is image data: a ScienceQA folder, or a JSON/JSONL file some row of which has
    an ``"image"``. An unreadable file is not (reading it reports the problem later)."""
    from .data import _read_json_rows

    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "problems.json"))
    try:
        rows = _read_json_rows(path)
    except (OSError, DataError):
        return False
    return isinstance(rows, list) and any(isinstance(row, dict) and row.get("image") is not None for row in rows)
