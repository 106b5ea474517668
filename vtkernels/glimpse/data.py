"""GlimpsePrune training data: Visual-CoT-style rows, checked, and turned into model inputs.

A row (one JSON object per line of a .jsonl file)::

    {"question": "...", "answer": "...", "image": "gqa/123.jpg", "width": 640, "height": 480,
     "bboxs": [[x1, y1, x2, y2], ...]}

``image`` is relative to an image folder; boxes are in pixels of the ``width`` x ``height`` image,
x2 > x1 and y2 > y1. ``read_rows`` checks every row before anything trains: a bad row (unreadable
JSON, a field missing, no box, an empty or inverted box, a box outside the image, the image file
missing or unreadable or of another size than the row says) is reported with its line number and
skipped, and the run stops with ``BadDataError`` when more than ``max_bad_fraction`` of the rows
read are bad (a wrong image folder should not train on the few rows that happen to resolve).

``GlimpseDataset`` pairs the rows with a model family's adapter (``adapters.py``): each item is the
processor's inputs with the glimpse slot before the answer, the answer labels and the box mask on
the model's token grid, mapped through the processor's real geometry (``box_grid_mask``).
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import IO, Iterable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["Row", "BadRow", "BadDataError", "read_rows", "box_grid_mask", "GlimpseDataset"]

Box = Tuple[float, float, float, float]

# Shown in a report before the rest is summed up: a broken file should not flood the terminal.
_REPORT_LINES = 20


@dataclass(frozen=True)
class Row:
    """A checked row. ``line``: its 1-based line in the file (or index + 1 of a list);
    ``image``: the resolved path."""
    line: int
    question: str
    answer: str
    image: str
    width: int
    height: int
    boxes: Tuple[Box, ...]


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class BadDataError(ValueError):
    """Too many bad rows (or none usable). ``bad_rows`` lists them all."""

    def __init__(self, message: str, bad_rows: Sequence[BadRow]):
        super().__init__(message)
        self.bad_rows = list(bad_rows)


class _Bad(Exception):
    pass


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value <= 0:
        raise _Bad(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _text(obj: dict, name: str) -> str:
    v = obj.get(name)
    if not isinstance(v, str) or not v.strip():
        raise _Bad(f"{name} missing or empty")
    return v.strip()


def _fmt_box(b) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in b) + "]"


def check_row(obj, line: int, images: str) -> Row:
    """A Row, or _Bad(reason). Cheap checks first; the image file (header only) last."""
    if not isinstance(obj, dict):
        raise _Bad(f"not a JSON object but {type(obj).__name__}")
    question, answer = _text(obj, "question"), _text(obj, "answer")
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise _Bad("image missing or empty")
    width, height = _positive_int(obj.get("width"), "width"), _positive_int(obj.get("height"), "height")
    boxes = obj.get("bboxs")
    if not isinstance(boxes, list) or not boxes:
        raise _Bad("no box (bboxs missing or empty)")
    checked = []
    for i, b in enumerate(boxes):
        if (not isinstance(b, (list, tuple)) or len(b) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)):
            raise _Bad(f"box {i} is not [x1, y1, x2, y2] in numbers: {b!r}")
        x1, y1, x2, y2 = (float(v) for v in b)
        if x2 <= x1 or y2 <= y1:
            raise _Bad(f"box {i} {_fmt_box(b)} is empty or inverted (needs x2 > x1, y2 > y1)")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise _Bad(f"box {i} {_fmt_box(b)} lies outside the {width}x{height} image")
        checked.append((x1, y1, x2, y2))
    path = os.path.join(images, image)
    if not os.path.isfile(path):
        raise _Bad(f"image file {path} not found")
    try:
        from PIL import Image
        with Image.open(path) as im:  # reads the header only
            size = im.size
    except Exception as e:  # PIL raises several types for a broken file
        raise _Bad(f"image file {path} unreadable ({type(e).__name__}: {e})")
    if size != (width, height):
        # The boxes are in the row's pixels: on another size they would mark the wrong patches.
        raise _Bad(f"image {path} is {size[0]}x{size[1]}, the row says {width}x{height}")
    return Row(line, question, answer, path, width, height, tuple(checked))


def _numbered(source) -> Iterable[Tuple[int, object]]:
    """(line, parsed object or _Bad) for a .jsonl path or an iterable of dicts; blank lines skipped."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    yield line, json.loads(text)
                except json.JSONDecodeError as e:
                    yield line, _Bad(f"unreadable JSON ({e.msg} at column {e.colno})")
    else:
        for line, obj in enumerate(source, 1):
            yield line, obj


def read_rows(source, images, max_bad_fraction: float = 0.1, max_samples: Optional[int] = None,
              report: Union[IO[str], str, None] = "stderr") -> Tuple[List[Row], List[BadRow], int]:
    """Reads and checks rows: (good rows, bad rows, rows read).

    source: a .jsonl path or an iterable of row dicts; images: the folder ``image`` is relative
    to. Reading stops once ``max_samples`` good rows are in. Bad rows are written to ``report``
    with their line numbers: "stderr" (the current sys.stderr), a text stream, or None (silent). Raises BadDataError when no row is usable or more
    than ``max_bad_fraction`` of the rows read are bad.
    """
    if isinstance(max_bad_fraction, bool) or not 0.0 <= float(max_bad_fraction) <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    images = os.fspath(images)
    if not os.path.isdir(images):
        raise ValueError(f"image folder {images} does not exist")
    rows: List[Row] = []
    bad: List[BadRow] = []
    read = 0
    for line, obj in _numbered(source):
        if max_samples is not None and len(rows) >= max_samples:
            break
        read += 1
        try:
            if isinstance(obj, _Bad):
                raise obj
            rows.append(check_row(obj, line, images))
        except _Bad as e:
            bad.append(BadRow(line, str(e)))
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "rows"
    if report == "stderr":
        report = sys.stderr  # looked up now: a caller (or pytest) may have replaced it
    if report is not None:
        for b in bad[:_REPORT_LINES]:
            print(f"glimpse data: skipped {name} {b}", file=report)
        if len(bad) > _REPORT_LINES:
            print(f"glimpse data: ... and {len(bad) - _REPORT_LINES} more bad rows", file=report)
        if bad:
            print(f"glimpse data: {read} rows read, {len(bad)} bad ({100 * len(bad) / read:.1f}%) and skipped, "
                  f"{len(rows)} used", file=report)
    if not rows:
        first = f"; first: {bad[0]}" if bad else ""
        raise BadDataError(f"{name}: no usable row ({read} read, {len(bad)} bad{first})", bad)
    if len(bad) > max_bad_fraction * read:
        shown = "; ".join(str(b) for b in bad[:5])
        raise BadDataError(f"{name}: {len(bad)} of {read} rows are bad ({100 * len(bad) / read:.1f}% > "
                           f"max_bad_fraction {100 * max_bad_fraction:.1f}%), e.g. {shown}. Check the image "
                           "folder and the file; raise max_bad_fraction to train on the good rows anyway", bad)
    return rows, bad, read


# --------------------------------------------------------------------------- boxes on the token grid

def box_grid_mask(boxes: Iterable[Box], rows: int, cols: int) -> torch.Tensor:
    """ALGORITHMS.md step 7: boxes in normalised [0, 1] coordinates of what the tower sees ->
    bool [rows * cols] (raster). A box covers grid rows int(y1 * rows) .. min(int(y2 * rows),
    rows - 1) and the columns alike, inclusive; the mask is their union."""
    m = torch.zeros(rows, cols, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes:
        r0, r1 = int(y1 * rows), min(int(y2 * rows), rows - 1)
        c0, c1 = int(x1 * cols), min(int(x2 * cols), cols - 1)
        m[r0:r1 + 1, c0:c1 + 1] = True
    return m.reshape(-1)


# --------------------------------------------------------------------------- the dataset

@dataclass
class GlimpseDataset(torch.utils.data.Dataset):
    """Checked rows + a processor + the model's adapter: ``ds[i]`` is one encoded sample (see the
    adapter's ``encode``). ``bad_rows`` and ``rows_read`` keep what ``read_rows`` found.

    Build it with ``GlimpseDataset.from_source(source, images, processor, model, ...)``.
    """
    rows: List[Row]
    processor: object
    adapter: object
    bad_rows: List[BadRow] = field(default_factory=list)
    rows_read: int = 0

    @classmethod
    def from_source(cls, source, images, processor, model, max_bad_fraction: float = 0.1,
                    max_samples: Optional[int] = None, report: Union[IO[str], str, None] = "stderr") -> "GlimpseDataset":
        """source: a .jsonl path or an iterable of row dicts; images: their folder; processor: the
        model's (Hugging Face) processor; model: the model or its config (picks the adapter: a
        ValueError or NotImplementedError for a family that cannot train yet)."""
        from .adapters import adapter_for
        adapter = adapter_for(model)  # first: an unsupported model fails before the data is read
        rows, bad, read = read_rows(source, images, max_bad_fraction, max_samples, report)
        return cls(rows, processor, adapter, bad, read)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:  # not the dataclass one: it would print the whole processor
        return (f"GlimpseDataset({len(self.rows)} rows, {len(self.bad_rows)} bad of {self.rows_read} read, "
                f"{type(self.adapter).__name__})")

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        from PIL import Image
        try:
            with Image.open(row.image) as im:
                image = im.convert("RGB")
        except Exception as e:
            # Checked at read time from the header; a file broken further in fails here, loudly.
            raise ValueError(f"line {row.line}: image {row.image} cannot be decoded ({e})") from e
        return self.adapter.encode(self.processor, image, row)

    def collate(self, items: Sequence[dict]) -> dict:
        """A training batch (the adapter's padding)."""
        return self.adapter.collate(items, self.processor)

    def prompts(self, items: Sequence[dict]) -> dict:
        """The prompts alone, as the processor would give them for inference (left-padded)."""
        return self.adapter.prompt_batch(items, self.processor)


def as_dataset(data, processor=None, images=None, model=None, **kwargs) -> GlimpseDataset:
    """``data`` as a GlimpseDataset: one already, or a source for ``GlimpseDataset.from_source``."""
    if isinstance(data, GlimpseDataset):
        return data
    if processor is None or images is None or model is None:
        raise ValueError("data is not a GlimpseDataset: pass processor= and images= to read it "
                         "(or build GlimpseDataset.from_source(...) yourself)")
    return GlimpseDataset.from_source(data, images, processor, model, **kwargs)

