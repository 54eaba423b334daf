"""make_grid: exact layout, cells hold the inputs unchanged, labels drawn, long prompts wrapped inside their row."""

import numpy as np
import pytest
from PIL import Image, ImageFont

from sdtune.inference.grid import GAP, GridLayout, make_grid, wrap_text


def noise_images(rows, columns, size, seed=0):
    rng = np.random.default_rng(seed)
    return [[Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(columns)]
            for _ in range(rows)]  # fmt: skip


@pytest.mark.parametrize(
    "rows, columns, size, expected",
    [
        # font 10, pad 5, line 13 → header 23; label column max(32, 100) = 100; 2 px gaps
        (2, 3, 32, (100 + 3 * 32 + 2 * 2, 23 + 2 * 32 + 1 * 2)),
        (2, 2, 64, (100 + 2 * 64 + 1 * 2, 23 + 2 * 64 + 1 * 2)),
        # 512 px cells: font 32, pad 16, line 41 → header 73; label column 512
        (1, 1, 512, (512 + 512, 73 + 512)),
    ],
)
def test_layout_size_is_exact(rows, columns, size, expected):
    grid = make_grid(noise_images(rows, columns, size), [f"prompt {r}" for r in range(rows)],
                     [f"seed {c}" for c in range(columns)])  # fmt: skip
    assert grid.size == expected == GridLayout(rows, columns, size, size).size
    assert grid.mode == "RGB"


def test_cells_hold_the_inputs_and_labels_are_drawn():
    images = noise_images(2, 3, 32)
    grid = np.asarray(make_grid(images, ["a red circle", "a blue square"], ["seed 0", "seed 1", "seed 2"]))
    for r in range(2):
        for c in range(3):
            x, y = 100 + c * (32 + GAP), 23 + r * (32 + GAP)
            assert np.array_equal(grid[y : y + 32, x : x + 32], np.asarray(images[r][c])), (r, c)
    assert (grid[23:55, :100] < 128).any()  # first row label has ink
    assert (grid[57:89, :100] < 128).any()  # second row label too
    for c in range(3):
        assert (grid[:23, 100 + c * 34 : 132 + c * 34] < 128).any()  # each column header has ink
    assert (grid[:23, :100] == 255).all()  # the corner stays blank
    assert (grid[:, 132:134] == 255).all()  # gaps are background


def test_long_prompt_wraps_inside_its_row_and_ends_with_ellipsis():
    long = "a watercolor painting of a lighthouse on a cliff at sunset, dramatic clouds, seagulls, " * 4
    images = noise_images(2, 1, 64)
    grid = np.asarray(make_grid(images, [long, "short"], ["seed 0"]))
    assert grid.shape[:2] == (23 + 64 + GAP + 64, 100 + 64)
    assert np.array_equal(grid[23:87, 100:164], np.asarray(images[0][0]))
    assert (grid[87 : 87 + GAP, :100] == 255).all()  # the wrapped label stops before the next row

    font = ImageFont.load_default(size=10)
    lines = wrap_text(long, font, 90, max_lines=4)
    assert len(lines) == 4 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 90 for line in lines)
    assert " ".join(lines).startswith("a watercolor painting of a lighthouse")
    assert wrap_text("a red circle", font, 90, max_lines=4) == ["a red circle"]
    word = wrap_text("x" * 100, font, 40, max_lines=20)  # one word wider than a line is split
    assert len(word) > 1 and all(font.getlength(line) <= 40 for line in word) and "".join(word) == "x" * 100


def test_mismatched_labels_or_sizes_are_rejected():
    images = noise_images(2, 2, 32)
    with pytest.raises(ValueError, match="row labels"):
        make_grid(images, ["only one"], ["a", "b"])
    with pytest.raises(ValueError, match="column labels"):
        make_grid(images, ["a", "b"], ["a"])
    images[1][1] = images[1][1].resize((16, 16))
    with pytest.raises(ValueError, match="same size"):
        make_grid(images, ["a", "b"], ["a", "b"])
