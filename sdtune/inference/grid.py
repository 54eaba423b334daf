"""A labelled contact sheet of generated images: one row per prompt, one column per seed.

Layout (all sizes in pixels, derived from the cell size so tests and readers can compute them):

    font     = clamp(cell_height // 16, 10, 32)       PIL's default font at that size
    pad      = font // 2                              around label text
    line     = font * 13 // 10                        label line height
    header   = line + 2 * pad                         column labels on top
    label    = max(cell_width, 10 * font)             row labels on the left, wrapped to this width
    gap      = 2                                      between cells

    width  = label  + columns * cell_width  + (columns - 1) * gap
    height = header + rows    * cell_height + (rows - 1)    * gap

Cell (row r, column c) starts at (label + c * (cell_width + gap), header + r * (cell_height + gap)) and holds the
input image unchanged. Row labels wrap at word boundaries; what does not fit in the cell's height ends in "...".
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

GAP = 2
ELLIPSIS = "..."
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes in a grid of `rows` × `columns` cells of `cell_width` × `cell_height`."""

    rows: int
    columns: int
    cell_width: int
    cell_height: int

    @property
    def font_size(self) -> int:
        return min(max(self.cell_height // 16, 10), 32)

    @property
    def pad(self) -> int:
        return self.font_size // 2

    @property
    def line_height(self) -> int:
        return self.font_size * 13 // 10

    @property
    def header_height(self) -> int:
        return self.line_height + 2 * self.pad

    @property
    def label_width(self) -> int:
        return max(self.cell_width, 10 * self.font_size)

    @property
    def size(self) -> tuple[int, int]:
        width = self.label_width + self.columns * self.cell_width + (self.columns - 1) * GAP
        height = self.header_height + self.rows * self.cell_height + (self.rows - 1) * GAP
        return width, height

    def cell_origin(self, row: int, column: int) -> tuple[int, int]:
        return (self.label_width + column * (self.cell_width + GAP), self.header_height + row * (self.cell_height + GAP))


def _ellipsize(text: str, font, width: float) -> str:
    """`text` shortened until `text...` fits in `width`."""
    while text and font.getlength(text + ELLIPSIS) > width:
        text = text[:-1]
    return text.rstrip() + ELLIPSIS


def _fit(text: str, font, width: float) -> str:
    """`text`, or if wider than `width` its start ended with "..."."""
    return text if font.getlength(text) <= width else _ellipsize(text, font, width)


def wrap_text(text: str, font, width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; words wider than a line are split; more than `max_lines` → "..."."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while font.getlength(word) > width and len(word) > 1:  # split a too-long word by characters
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _ellipsize(lines[-1], font, width)
    return lines


def make_grid(images: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """Images[row][column] (all the same size) as one RGB image with row labels left and column labels on top."""
    if not images or not images[0]:
        raise ValueError("make_grid needs at least one image")
    if len(row_labels) != len(images) or any(len(row) != len(col_labels) for row in images):
        raise ValueError(
            f"make_grid: {len(images)} rows × {[len(row) for row in images]} images for "
            f"{len(row_labels)} row labels and {len(col_labels)} column labels"
        )
    cell_width, cell_height = images[0][0].size
    if any(image.size != (cell_width, cell_height) for row in images for image in row):
        raise ValueError("make_grid: all images must have the same size")

    layout = GridLayout(len(images), len(col_labels), cell_width, cell_height)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=layout.font_size)
    pad, line = layout.pad, layout.line_height

    for column, label in enumerate(col_labels):
        x, _ = layout.cell_origin(0, column)
        text = _fit(label, font, cell_width)
        offset = (cell_width - font.getlength(text)) / 2
        draw.text((x + offset, pad), text, fill=INK, font=font)

    max_lines = max(1, (cell_height - 2 * pad) // line)
    for row, label in enumerate(row_labels):
        _, y = layout.cell_origin(row, 0)
        for i, text in enumerate(wrap_text(label, font, layout.label_width - 2 * pad, max_lines)):
            draw.text((pad, y + pad + i * line), text, fill=INK, font=font)

    for row, images_of_row in enumerate(images):
        for column, image in enumerate(images_of_row):
            sheet.paste(image.convert("RGB"), layout.cell_origin(row, column))
    return sheet
