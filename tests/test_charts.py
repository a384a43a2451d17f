"""The loss chart (charts.py): a PNG of the chart's size with each series in its colour."""

from PIL import Image

from cogvideox_lora import charts


def test_the_loss_chart_is_a_png_of_its_size_with_each_line(tmp_path):
    train = [(step, 1.0 / step) for step in range(1, 41)]
    path = charts.loss_chart(tmp_path / "loss.png", train, [(10, 0.2), (20, 0.1)], base=0.3)
    with Image.open(path) as chart:
        assert chart.format == "PNG" and chart.size == charts.SIZE
        colours = {colour for _, colour in chart.convert("RGB").getcolors(1 << 20)}
    assert {(170, 200, 230), (30, 90, 170), (220, 90, 20), (90, 90, 90)} <= colours
    assert charts.moving_mean([(1, 1.0), (2, 3.0), (3, 5.0)], 2) == [(1, 1.0), (2, 2.0), (3, 4.0)]  # the first steps: the mean of those so far
