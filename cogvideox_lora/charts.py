"""loss.png: the training and held-out loss over the steps, as a plain line chart drawn with Pillow (no plotting
library to install for one picture)."""

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = (900, 480)
MARGIN = (80, 50, 30, 60)  # left, top, right, bottom
TICKS = 5


@dataclass(frozen=True)
class Series:
    label: str
    points: list[tuple[float, float]]  # (step, value)
    colour: tuple[int, int, int]
    width: int = 2
    markers: bool = False


def moving_mean(points: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Each point's value averaged with the window - 1 before it (fewer at the start)."""
    values = [v for _, v in points]
    return [(x, sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)))
            for i, (x, _) in enumerate(points)]


def _ticks(low: float, high: float) -> list[float]:
    return [low + (high - low) * k / (TICKS - 1) for k in range(TICKS)]


def line_chart(path, title: str, series: list[Series], baseline: tuple[str, float] | None = None) -> Path:
    """Draws the series (and a dashed horizontal baseline with its label) against steps; writes a PNG to path."""
    image = Image.new("RGB", SIZE, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    xs = [x for s in series for x, _ in s.points] or [0.0]
    ys = [y for s in series for _, y in s.points] + ([baseline[1]] if baseline else []) or [0.0]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    pad = (max(ys) - min(ys)) * 0.05 or abs(max(ys)) * 0.05 or 1.0
    y0, y1 = min(ys) - pad, max(ys) + pad

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    draw.rectangle((left, top, right, bottom), outline="black")
    for x in _ticks(x0, x1):
        px = at(x, y0)[0]
        draw.line((px, bottom, px, bottom + 5), fill="black")
        draw.text((px, bottom + 8), f"{x:.0f}", fill="black", font=font, anchor="ma")
    for y in _ticks(y0, y1):
        py = at(x0, y)[1]
        draw.line((left, py, right, py), fill=(230, 230, 230))
        draw.text((left - 8, py), f"{y:.4g}", fill="black", font=font, anchor="rm")
    draw.text(((left + right) / 2, SIZE[1] - 20), "optimizer step", fill="black", font=font, anchor="mm")
    draw.text(((left + right) / 2, top / 2), title, fill="black", font=font, anchor="mm")
    if baseline:
        py = at(x0, baseline[1])[1]
        for start in range(left, right, 12):
            draw.line((start, py, min(start + 6, right), py), fill=(90, 90, 90), width=2)
    for s in series:
        pixels = [at(x, y) for x, y in s.points]
        if len(pixels) > 1:
            draw.line(pixels, fill=s.colour, width=s.width)
        if s.markers:
            for px, py in pixels:
                draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=s.colour)
    labels = [(s.label, s.colour) for s in series] + ([(baseline[0], (90, 90, 90))] if baseline else [])
    for i, (label, colour) in enumerate(labels):
        y = top + 10 + 16 * i
        draw.rectangle((right - 230, y - 4, right - 222, y + 4), fill=colour)
        draw.text((right - 216, y), label, fill="black", font=font, anchor="lm")
    path = Path(path)
    image.save(path)
    return path


def loss_chart(path, train: list, heldout: list, base: float | None) -> Path:
    """loss.png of a run: its training loss (each step, and a moving mean), its held-out loss and the base model's."""
    series = [Series("training loss", train, (170, 200, 230), width=1)]
    if len(train) >= 10:
        series.append(Series(f"training loss, mean of {max(2, len(train) // 20)} steps",
                             moving_mean(train, max(2, len(train) // 20)), (30, 90, 170)))
    if heldout:
        series.append(Series("held-out loss", heldout, (220, 90, 20), markers=True))
    return line_chart(path, "Loss", series, None if base is None else ("held-out loss of the base model", base))
