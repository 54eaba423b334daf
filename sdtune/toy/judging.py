"""Scoring samples of the shapes world: does each image show the colour and the shape its prompt asks for?

Prompts are "a {color} {shape}" (a PIL colour name, one of the judge's shapes), as `sdtune prep shapes` captions
its images; `sdtune.toy.shapes.judge` reads each image back. `sdtune evaluate --judge shapes` reports the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from PIL import Image, ImageColor

from sdtune.errors import SdtuneError
from sdtune.toy.shapes import JUDGE_COLORS, SHAPES, Judgement, judge

ARTICLES = ("a", "an")  # the dataset writes "a orange square"; "an orange square" means the same


def is_color(name: str) -> bool:
    """Whether PIL knows `name` as a colour (the only kind the judge can be given)."""
    try:
        ImageColor.getrgb(name)
    except ValueError:
        return False
    return True


def parse_prompt(prompt: str, shapes: Sequence[str] = SHAPES) -> tuple[str, str]:
    """(color, shape) of "a {color} {shape}", lower-cased; anything else is a one-line error naming the prompt."""
    words = prompt.lower().split()
    if len(words) != 3 or words[0] not in ARTICLES:
        raise SdtuneError(f"--judge shapes: prompt '{prompt}' is not of the form 'a {{color}} {{shape}}', e.g. 'a red circle'")
    _, color, shape = words
    if not is_color(color):
        raise SdtuneError(f"--judge shapes: prompt '{prompt}': '{color}' is not a PIL colour name (e.g. red, purple)")
    if shape not in shapes:
        raise SdtuneError(f"--judge shapes: prompt '{prompt}': '{shape}' is not a shape the judge knows ({', '.join(shapes)})")
    return color, shape


def shape_prompts(colors: Sequence[str], shapes: Sequence[str] = SHAPES) -> list[str]:
    """Every "a {color} {shape}", colour-major: the prompts of --judge-colors × --judge-shapes."""
    if not colors or not shapes:
        raise SdtuneError("--judge-colors and --judge-shapes must each name at least one")
    for color in colors:
        if len(color.split()) != 1 or not is_color(color):
            raise SdtuneError(f"--judge-colors: '{color}' is not a PIL colour name (e.g. red, purple)")
    for shape in shapes:
        if shape not in SHAPES:
            raise SdtuneError(f"--judge-shapes: '{shape}' is not a shape the judge knows ({', '.join(SHAPES)})")
    return [f"a {color} {shape}" for color in colors for shape in shapes]


def judge_palette(prompts: Iterable[str]) -> tuple[str, ...]:
    """JUDGE_COLORS plus every prompt colour not among them, so each asked-for colour can be named."""
    palette = list(JUDGE_COLORS)
    for prompt in prompts:
        color, _ = parse_prompt(prompt)
        if color not in palette:
            palette.append(color)
    return tuple(palette)


def is_right(prompt: str, judgement: Judgement | None) -> tuple[bool, bool]:
    """(colour right, shape right); an unreadable image or a colour of nothing named is wrong.

    Colours are compared as RGB, so a prompt's "fuchsia" is the judge's "magenta"."""
    if judgement is None:
        return False, False
    color, shape = parse_prompt(prompt)
    same_color = judgement.color is not None and ImageColor.getrgb(judgement.color) == ImageColor.getrgb(color)
    return same_color, judgement.shape == shape


def accuracy(samples: Sequence[tuple[str, Judgement | None]]) -> dict:
    """Share of samples whose colour, shape and both are right: overall and per prompt (in first-seen order)."""
    if not samples:
        raise SdtuneError("--judge shapes: no images to score")
    per_prompt: dict[str, list[tuple[bool, bool]]] = {}
    for prompt, judgement in samples:
        per_prompt.setdefault(prompt, []).append(is_right(prompt, judgement))

    def shares(marks: list[tuple[bool, bool]]) -> dict:
        count = len(marks)
        return {
            "color": sum(c for c, _ in marks) / count,
            "shape": sum(s for _, s in marks) / count,
            "both": sum(c and s for c, s in marks) / count,
            "count": count,
        }

    overall = shares([mark for marks in per_prompt.values() for mark in marks])
    return {**overall, "prompts": [{"prompt": prompt, **shares(marks)} for prompt, marks in per_prompt.items()]}


def score(samples: Sequence[tuple[str, Image.Image]], colors: Sequence[str] | None = None) -> dict:
    """`accuracy` of (prompt, image) pairs, each image judged with `colors` (default: `judge_palette` of the prompts)."""
    palette = tuple(colors) if colors is not None else judge_palette(prompt for prompt, _ in samples)
    return accuracy([(prompt, judge(image, palette)) for prompt, image in samples])


def format_table(rows: Sequence[tuple[str, dict]]) -> str:
    """(model name, accuracy) rows as a fixed-width text table of percentages."""
    width = max(len("model"), *(len(name) for name, _ in rows))
    lines = [f"{'model':<{width}}  {'colour':>6}  {'shape':>6}  {'both':>6}  images"]
    for name, result in rows:
        cells = "  ".join(f"{100 * result[key]:5.1f}%" for key in ("color", "shape", "both"))
        lines.append(f"{name:<{width}}  {cells}  {result['count']:>6}")
    return "\n".join(lines)
