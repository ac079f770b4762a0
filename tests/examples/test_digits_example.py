"""Issue 12's proof on real images, shortened: ``examples/digits_scienceqa.py`` (scikit-learn's handwritten digits as
ScienceQA, ``stories260K`` and a tiny random frozen CLIP tower) trains the image-conditioned adapter and the held-out
answers follow the images: well above chance (25%) and above the same adapter scored without its images. Before the
projection standardised the tower's features the demo answered one letter for every image (21.8%)."""
import importlib.util
import json
import pathlib

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "digits_scienceqa.py"


@pytest.mark.slow
def test_the_digits_demo_reads_the_images(tmp_path, shared_data):
    spec = importlib.util.spec_from_file_location("digits_scienceqa", EXAMPLE)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--out", str(tmp_path), "--shared-data", str(shared_data), "--max-steps", "200",
                      "--eval-limit", "100"]) == 0
    with_images = json.loads((tmp_path / "eval-test.json").read_text())
    without = json.loads((tmp_path / "eval-test-no-images.json").read_text())
    assert with_images["images"] is True and without["images"] is False
    assert with_images["problems"] == without["problems"] == 100 and with_images["chance"] == 0.25
    assert with_images["accuracy"] >= 0.5, with_images["accuracy"]
    assert with_images["accuracy"] >= without["accuracy"] + 0.2, (with_images["accuracy"], without["accuracy"])
    # Not one letter for everything: the predictions use at least three of the four options.
    assert len(set(with_images["predictions"].values())) >= 3
