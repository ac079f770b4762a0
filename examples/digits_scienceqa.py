"""Multimodal LLaMA-Adapter end to end on real images, on a CPU, in a few minutes.

scikit-learn ships 1,797 real handwritten digits (``sklearn.datasets.load_digits``, 8×8 grey levels). This
script writes them out as a ScienceQA dataset in LaVIN's layout ("Which digit is shown?" with four options),
builds a tiny CLIP vision tower (``CLIPVisionConfig``, random weights, saved as a local Hugging Face folder:
no pretrained weights can be downloaded here; frozen, it is a fixed random feature extractor), trains
``stories260K`` with image-conditioned prompts (``fastadapter train --vision-model``), and evaluates the held-out
test split with and without the images (``fastadapter eval --task scienceqa``)::

    python examples/digits_scienceqa.py --out run/digits            # data, tower, train, eval
    python examples/digits_scienceqa.py --out run/digits --prepare-only   # only the data and the tower

By default the problems use the digits 0-3 and always offer ``(A) 0 (B) 1 (C) 2 (D) 3``, so that the answer
depends on the image alone (chance: 25%); ``--classes 10`` uses every digit and four options drawn per problem
(the right one and three others, in ascending order), which also asks the model to read the options.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def write_digits_scienceqa(folder: str, *, classes: int = 4, seed: int = 0,
                           fractions: tuple[float, float] = (0.62, 0.1)) -> dict:
    """Write the digits of ``0..classes-1`` as a ScienceQA folder (problems.json, pid_splits.json,
    images/<split>/<pid>/image.png); returns ``{split: count}``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if not 4 <= classes <= 10:
        raise ValueError(f"classes must lie in [4, 10] (four options), got {classes}")
    digits = load_digits()
    keep = [i for i, target in enumerate(digits.target) if target < classes]
    rng = random.Random(seed)
    rng.shuffle(keep)
    n_train, n_val = int(fractions[0] * len(keep)), int(fractions[1] * len(keep))
    split_of = {i: ("train" if k < n_train else "val" if k < n_train + n_val else "test")
                for k, i in enumerate(keep)}
    problems, splits = {}, {"train": [], "val": [], "test": []}
    for i in keep:
        pid, split, target = str(i), split_of[i], int(digits.target[i])
        if classes == 4:
            options = [0, 1, 2, 3]
        else:
            options = sorted([target] + rng.sample([d for d in range(classes) if d != target], 3))
        pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        image_folder = os.path.join(folder, "images", split, pid)
        os.makedirs(image_folder, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(os.path.join(image_folder, "image.png"))
        problems[pid] = {"question": "Which digit is shown?", "choices": [str(d) for d in options],
                         "answer": options.index(target), "hint": "", "image": "image.png", "task": "closed choice",
                         "grade": "grade1", "subject": "natural science", "topic": "digits",
                         "category": "handwritten digits", "skill": "recognise digits", "lecture": "",
                         "solution": f"The image shows the digit {target}.", "split": split}
        splits[split].append(pid)
    with open(os.path.join(folder, "problems.json"), "w") as f:
        json.dump(problems, f)
    with open(os.path.join(folder, "pid_splits.json"), "w") as f:
        json.dump(splits, f)
    return {split: len(pids) for split, pids in splits.items()}


def write_tiny_clip_tower(folder: str, *, seed: int = 0) -> None:
    """A tiny CLIP vision tower with random weights (32×32 inputs, 4×4 patches, 4 layers of width 64) and its
    image processor, saved with ``save_pretrained``."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              image_size=32, patch_size=4, projection_dim=32)
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="run/digits", help="folder for the data, the tower and the run")
    parser.add_argument("--shared-data", default=DEFAULT_DATA, help="folder holding stories260K.bin and tok512.bin")
    parser.add_argument("--classes", type=int, default=4, help="digits 0..N-1 (4: fixed options; up to 10)")
    parser.add_argument("--max-steps", type=int, default=400, help="optimizer steps (about 5 passes over the "
                        "446 training problems at the default --batch-tokens)")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="tokens per packed row (about 6 problems)")
    parser.add_argument("--lr", type=float, default=4e-2)
    parser.add_argument("--eval-limit", type=int, help="evaluate only the first N test problems (default: all)")
    parser.add_argument("--prepare-only", action="store_true", help="write the data and the tower, then stop")
    args = parser.parse_args(argv)

    data, tower = os.path.join(args.out, "scienceqa"), os.path.join(args.out, "tiny-clip")
    counts = write_digits_scienceqa(data, classes=args.classes)
    write_tiny_clip_tower(tower)
    print(f"data: {data} ({counts}); vision tower: {tower}")
    if args.prepare_only:
        return 0
    from fastadapter.cli import main as fastadapter

    model, tokenizer = os.path.join(args.shared_data, "stories260K.bin"), os.path.join(args.shared_data, "tok512.bin")
    run = os.path.join(args.out, "train")
    code = fastadapter(["train", "--model", model, "--tokenizer", tokenizer, "--data", data, "--vision-model", tower,
                        "--out", run, "--overwrite", "--max-steps", str(args.max_steps), "--lr", str(args.lr),
                        "--batch-tokens", str(args.batch_tokens), "--max-seq-len", "256", "--eval-fraction", "0.05",
                        "--eval-every", "100", "--save-every", "200", "--no-progress"])
    if code:
        return code
    adapter = os.path.join(run, "adapter.safetensors")
    common = ["eval", "--task", "scienceqa", "--model", model, "--tokenizer", tokenizer, "--adapter", adapter,
              "--data", data, "--split", "test"]
    if args.eval_limit:
        common += ["--limit", str(args.eval_limit)]
    code = fastadapter(common + ["--vision-model", tower, "--out", os.path.join(args.out, "eval-test.json")])
    if code:
        return code
    return fastadapter(common + ["--no-images", "--out", os.path.join(args.out, "eval-test-no-images.json")])


if __name__ == "__main__":
    sys.exit(main())
