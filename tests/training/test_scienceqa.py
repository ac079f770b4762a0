"""ScienceQA data (LaVIN's layout, the official field names), the paper's question format, bad problems reported
by pid, generic image-instruction rows, packing image and text rows together, the evaluation's scoring and
categories, and the commands end to end on stories260K with a tiny CLIP tower: `fastadapter train
--vision-model` (and its exact resume), `fastadapter eval --task scienceqa`, `fastadapter generate --image`."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastadapter.cli import main as cli_main
from fastadapter.adapters import AdapterConfig, add_adapter
from fastadapter.model import LlamaModel
from fastadapter.training.data import IGNORE_INDEX, DataError, Example
from fastadapter.training.image_data import (ImageExample, PixelCache, collate_images,
                                             load_image_instruction_examples)
from fastadapter.training.packing import collate_packed
from fastadapter.training.prompt import format_prompt
from fastadapter.training.scienceqa import (format_answer, format_question, load_problems,
                                            load_scienceqa_examples)
from fastadapter.training.scienceqa_eval import accuracy_report, option_examples, predict

from hf_folders import write_tower

LECTURE = "Figures of speech are words or phrases that use language in a nonliteral or unusual way."


def problem(question, choices, answer, *, hint="", image=None, split="train", grade="grade5",
            subject="natural science"):
    """A problem with every field of the official problems.json."""
    return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
            "task": "closed choice", "grade": grade, "subject": subject, "topic": "science-and-engineering",
            "category": "Designing experiments", "skill": "Identify control and experimental groups",
            "lecture": LECTURE, "solution": "Look at the picture.", "split": split}


def save_image(folder, split, pid, seed):
    path = folder / "images" / split / pid
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(path / "image.png")


@pytest.fixture()
def scienceqa(tmp_path):
    """A hand-made ScienceQA folder: 4 good train problems (images, a hint, text only), 2 bad ones, 2 test ones."""
    folder = tmp_path / "scienceqa"
    folder.mkdir()
    problems = {
        "1": problem("Which animal's feet are also adapted to dig?", ["mole", "kangaroo"], 0, image="image.png"),
        "2": problem("What is the capital of Utah?", ["Salt Lake City", "Denver", "Boise"], 0,
                     hint="Utah is a state.", subject="social science", grade="grade8"),
        "3": problem("Which word would you find on a dictionary page?", ["bell", "ivy", "snow", "apple"], 2,
                     subject="language science", grade="grade2"),
        "4": problem("Which magnet pulls harder?", ["left", "right"], 1, hint="Look at the magnets.",
                     image="image.png", grade="grade10"),
        "5": problem("Which is a solid?", ["milk", "rock"], 5),  # answer index out of range
        "6": problem("Which is a gas?", ["steam", "ice"], 0, image="image.png"),  # image file missing
        "7": problem("Which tree is taller?", ["oak", "fern"], 0, image="image.png", split="test"),
        "8": problem("Which is heavier?", ["stone", "feather"], 0, split="test", grade="grade9"),
    }
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps({"train": ["1", "2", "3", "4", "5", "6"], "val": [],
                                                        "test": ["7", "8"]}))
    save_image(folder, "train", "1", 0)
    save_image(folder, "train", "4", 1)
    save_image(folder, "test", "7", 2)
    return folder


class CharTokenizer:
    """One token per byte (ids 3..258), BOS 1, EOS 2."""
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=True, eos=False):
        return ([1] if bos else []) + [3 + b for b in text.encode()] + ([2] if eos else [])


@pytest.fixture
def char_config(make_config):
    """A 2-layer LLaMA of width 48 (4 query heads over 2 kv heads, FFN 64) over :class:`CharTokenizer`'s 260 ids,
    512 positions: room for a question and its options."""
    return make_config(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=260, hidden_dim=64, max_seq_len=512)


def test_problems_are_read_in_the_official_layout_and_bad_ones_reported_by_pid(scienceqa):
    with pytest.warns(UserWarning) as caught:
        problems = load_problems(scienceqa, "train")
    messages = " ".join(str(w.message) for w in caught)
    assert "problem 5" in messages and "answer index 5 is out of range for 2 choices" in messages
    assert "problem 6" in messages and "image file not found" in messages
    assert [p.pid for p in problems] == ["1", "2", "3", "4"]
    first = problems[0]
    assert first.image == str(scienceqa / "images" / "train" / "1" / "image.png")
    assert problems[1].image is None and first.answer_letter == "A" and problems[2].answer_letter == "C"
    assert format_question(problems[1]) == ("Context: Utah is a state.\nQuestion: What is the capital of Utah?\n"
                                            "Options: (A) Salt Lake City (B) Denver (C) Boise")
    assert format_question(first).startswith("Context: N/A\n")
    assert format_answer("B") == "The answer is (B)."
    assert problems[3].categories() == {"subject": ["natural science"], "context": ["TXT", "IMG"],
                                        "grade": ["grade10", "G7-12"]}
    assert problems[2].categories()["context"] == ["NO"]
    with pytest.raises(DataError, match="problem 5 is malformed: answer index 5"):
        load_problems(scienceqa, "train", on_bad_row="error")
    with pytest.raises(DataError, match=r"no split 'dev'; it has \['test', 'train', 'val'\]"):
        load_problems(scienceqa, "dev")


def test_scienceqa_examples_carry_their_image_and_learn_only_the_answer(scienceqa):
    with pytest.warns(UserWarning):
        examples, report = load_scienceqa_examples(scienceqa, CharTokenizer(), 512)
    assert len(report.bad_rows) == 2 and report.rows == 6
    assert [e.key for e in examples] == ["1", "2", "3", "4"]
    assert examples[0].image.endswith("images/train/1/image.png") and examples[1].image is None
    answer = [t for t in examples[2].labels if t != IGNORE_INDEX]
    assert bytes(t - 3 for t in answer[:-1]).decode() == "The answer is (C)." and answer[-1] == 2
    prompt = format_prompt(format_question(load_problems(scienceqa, "test")[1]), "")
    assert "### Instruction:\nContext: N/A\nQuestion: Which is heavier?" in prompt


def test_image_instruction_rows_with_and_without_images(tmp_path):
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    rows = [{"instruction": "Describe the image.", "output": "Black.", "image": "a.png"},
            {"instruction": "Say hi.", "output": "Hi."},
            {"instruction": "Describe it.", "output": "Red.", "image": "missing.png"}]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.warns(UserWarning, match="row 2.*image file not found"):
        examples, report = load_image_instruction_examples(data, CharTokenizer(), 256)
    assert [e.image for e in examples] == [str(tmp_path / "a.png"), None] and [e.row for e in examples] == [0, 1]
    assert report.bad_rows[0][0] == 2
    with pytest.raises(DataError, match="row 2 is malformed: image file not found"):
        load_image_instruction_examples(data, CharTokenizer(), 256, on_bad_row="error")


def test_collate_packs_image_and_text_rows_and_computes_a_shared_image_once():
    calls = []

    def pixels(paths):
        calls.append(list(paths))
        return torch.stack([torch.full((3, 4, 4), float(len(p))) for p in paths])

    text = Example((1, 5, 6), (IGNORE_INDEX, 6, 2))
    a = ImageExample((1, 7), (7, 2), image="/x/a.png")
    b = ImageExample((1, 8, 9, 9), (IGNORE_INDEX, 9, 9, 2), image="/x/bb.png")
    batch = collate_images([a, text, b, a], pixels)
    plain = collate_packed([a, text, b, a])
    assert torch.equal(batch.tokens, plain.tokens) and torch.equal(batch.cu_seqlens, plain.cu_seqlens)
    assert batch.image_index.tolist() == [0, -1, 1, 0] and calls == [["/x/a.png", "/x/bb.png"]]
    assert batch.pixel_values.shape == (2, 3, 4, 4)
    assert set(batch.extra_inputs()) == {"pixel_values", "image_index"}


def test_train_standardises_the_image_features_over_the_distinct_training_images():
    """``fastadapter train --vision-model`` calibrates the projection (issue 12) on each distinct training image
    once, evenly spaced when there are more than it needs, in chunks; with fewer than 2 images it leaves it."""
    from fastadapter.recipes.adapter_finetune import calibrate_projection

    class Recorder:
        def __init__(self):
            self.batches = None

        def calibrate(self, batches):
            self.batches = [list(b) for b in batches]
            return sum(len(b) for b in self.batches)

    text = Example((1, 5), (5, 2))
    examples = [ImageExample((1, 7), (7, 2), image=f"/x/{i % 7}.png") for i in range(20)] + [text]
    mm = Recorder()
    assert calibrate_projection(mm, examples, lambda paths: list(paths), max_images=100, chunk=3) == 7
    assert mm.batches == [["/x/0.png", "/x/1.png", "/x/2.png"], ["/x/3.png", "/x/4.png", "/x/5.png"], ["/x/6.png"]]
    assert calibrate_projection(mm, examples, lambda paths: list(paths), max_images=3) == 3
    assert mm.batches == [["/x/0.png", "/x/3.png", "/x/6.png"]]
    mm = Recorder()
    assert calibrate_projection(mm, examples[:1] + [text], lambda paths: list(paths)) == 0
    assert mm.batches is None


def test_pixel_cache_reads_each_image_once_within_its_budget(tmp_path):
    paths = []
    for i in range(3):
        Image.fromarray(np.full((4, 4, 3), i * 40, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    seen = []

    def preprocess(images):
        seen.append(len(images))
        return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images])

    cache = PixelCache(preprocess, max_bytes=2 * 3 * 4 * 4 * 4)  # room for two images
    first = cache(paths[:2])
    assert torch.equal(cache(paths[:2]), first) and seen == [2]
    cache(paths[2:])  # evicts the least recently used
    cache(paths[:1])
    assert seen == [2, 1, 1]


def test_accuracy_by_subject_context_and_grade(scienceqa):
    with pytest.warns(UserWarning):
        problems = load_problems(scienceqa, "train")
    report = accuracy_report(problems, [0, 1, 2, 1])  # 1, 3 and 4 right; 2 wrong
    assert report["accuracy"] == 0.75 and report["correct"] == 3
    assert report["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 2) / 4)
    assert report["by_subject"]["social science"] == {"count": 1, "correct": 0, "accuracy": 0.0}
    assert report["by_context"]["IMG"]["count"] == 2 and report["by_context"]["TXT"]["accuracy"] == 0.5
    assert report["by_context"]["NO"] == {"count": 1, "correct": 1, "accuracy": 1.0}
    assert report["by_grade"]["G1-6"]["count"] == 2 and report["by_grade"]["G7-12"]["accuracy"] == 0.5
    assert report["predictions"] == {"1": "A", "2": "B", "3": "C", "4": "B"}


def test_packed_option_scores_equal_each_option_scored_alone(scienceqa, char_config):
    """predict's packed scoring picks, per problem, the option whose response the model finds most likely when
    each option is run on its own."""
    torch.manual_seed(0)
    model = add_adapter(LlamaModel(char_config), AdapterConfig(prompt_len=3, layers=1))
    with pytest.warns(UserWarning):
        problems = load_problems(scienceqa, "train")[1:3]  # 3 + 4 options
    tokenizer = CharTokenizer()
    chosen = predict(model, problems, tokenizer, max_seq_len=512, batch_tokens=700)
    options = option_examples(problems, tokenizer, 512, with_images=False)
    best = {}
    for pi, c, example in options:
        tokens = torch.tensor([example.tokens])
        labels = torch.tensor(example.labels)
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens)[0].float(), -1)
        mask = labels != IGNORE_INDEX
        score = float(logp[mask].gather(1, labels[mask][:, None]).sum())
        if pi not in best or score > best[pi][0]:
            best[pi] = (score, c)
    assert chosen == [best[i][1] for i in range(len(problems))]


def _train_args(shared_data, data, tower, out, *extra):
    return ["train", "--model", str(shared_data / "stories260K.bin"), "--tokenizer", str(shared_data / "tok512.bin"),
            "--data", str(data), "--vision-model", str(tower), "--out", str(out), "--batch-tokens", "512",
            "--max-seq-len", "256", "--eval-fraction", "0", "--prompt-len", "4", "--adapter-layers", "2",
            "--vision-layers", "1,3", "--save-every", "1", "--keep-checkpoints", "0", "--warmup", "1",
            "--no-progress", *extra]


@pytest.mark.slow
def test_train_eval_and_generate_with_images_end_to_end(tmp_path, shared_data, scienceqa, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tower = write_tower(tmp_path / "tower")
    out = tmp_path / "run"
    with pytest.warns(UserWarning):
        assert cli_main(_train_args(shared_data, scienceqa, tower, out, "--max-steps", "3")) == 0
    printed = capsys.readouterr().out
    assert "images: 2 of 4 examples have one" in printed and "--image IMAGE" in printed
    assert "image features standardised over 2 training images" in printed
    adapter = out / "adapter.safetensors"
    with safe_open(str(adapter), "pt") as f:
        meta = json.loads(f.metadata()["fastadapter"])
        names = set(f.keys())
    assert meta["vision"]["tower"]["layers"] == [1, 3] and meta["vision"]["fusion"] == "all"
    assert {"vision.projection.linear.weight", "vision.projection.norm.weight", "vision.projection.feature_mean",
            "vision.projection.feature_std"} <= names
    final = load_file(str(adapter))
    assert not torch.equal(final["vision.projection.feature_std"], torch.ones(72))  # calibrated: 2 layers × 36

    # Resuming step 1's checkpoint reaches the same adapter bit for bit (the vision settings are part of the run).
    with pytest.warns(UserWarning):
        assert cli_main(_train_args(shared_data, scienceqa, tower, out, "--max-steps", "3", "--resume",
                                    str(out / "checkpoints" / "step_000001.pt"))) == 0
    resumed = load_file(str(adapter))
    assert all(torch.equal(resumed[name], final[name]) for name in final)
    other = write_tower(tmp_path / "other", seed=5)
    capsys.readouterr()
    with pytest.warns(UserWarning):
        assert cli_main(_train_args(shared_data, scienceqa, other, out, "--max-steps", "3", "--resume")) == 2
    assert "vision=" in capsys.readouterr().err

    report_path = tmp_path / "eval.json"
    assert cli_main(["eval", "--task", "scienceqa", "--model", str(shared_data / "stories260K.bin"),
                     "--tokenizer", str(shared_data / "tok512.bin"), "--adapter", str(adapter), "--vision-model",
                     str(tower), "--data", str(scienceqa), "--split", "test", "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["problems"] == 2 and report["images"] is True and set(report["predictions"]) == {"7", "8"}
    assert report["by_context"]["IMG"]["count"] == 1 and report["by_context"]["NO"]["count"] == 1
    assert math.isclose(report["chance"], 0.5)
    assert cli_main(["eval", "--task", "scienceqa", "--model", str(shared_data / "stories260K.bin"),
                     "--tokenizer", str(shared_data / "tok512.bin"), "--adapter", str(adapter), "--vision-model",
                     str(other), "--data", str(scienceqa), "--split", "test"]) == 2
    assert "another vision tower of the same shape" in capsys.readouterr().err

    image = scienceqa / "images" / "test" / "7" / "image.png"
    assert cli_main(["generate", "--model", str(shared_data / "stories260K.bin"), "--tokenizer",
                     str(shared_data / "tok512.bin"), "--adapter", str(adapter), "--vision-model", str(tower),
                     "--image", str(image), "--template", "alpaca", "--prompt", "Which tree is taller?",
                     "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli_main(["generate", "--model", str(shared_data / "stories260K.bin"), "--adapter", str(adapter),
                     "--image", str(image), "--prompt", "x"]) == 2
    assert "--image needs a multimodal --adapter" in capsys.readouterr().err


def test_multimodal_training_learns_resumes_exactly_and_saves_the_projection(tmp_path, scienceqa, char_config):
    """The trainer on a MultimodalLlama with image and text rows packed together: the step-0 eval is the base
    model's, the run learns, resuming step 2's checkpoint reaches the same parameters bit for bit, and the
    adapter file written at the end holds the projection."""
    from fastadapter.training.trainer import TrainConfig, train
    from fastadapter.vision import VisionTower, add_vision, load_multimodal_adapter, save_multimodal_adapter

    tower_dir = write_tower(tmp_path / "tower")
    with pytest.warns(UserWarning):
        examples, _ = load_scienceqa_examples(scienceqa, CharTokenizer(), 400)

    def run(resume=None):
        torch.manual_seed(0)
        model = add_adapter(LlamaModel(char_config), AdapterConfig(prompt_len=3, layers=2))
        mm = add_vision(model, VisionTower.from_folder(tower_dir, layers=[2, 3]))
        pixels = PixelCache(mm.tower.preprocess)
        train_config = TrainConfig(out=str(tmp_path / "run"), batch_tokens=500, max_steps=4, lr=5e-2,
                                   warmup_steps=1, eval_every=0, save_every=2, keep_checkpoints=0, progress=False)
        result = train(mm, examples[:3], examples[3:], train_config, resume=resume,
                       collate_fn=lambda rows: collate_images(rows, pixels), save_adapter_fn=save_multimodal_adapter)
        return mm, result

    mm, result = run()
    assert result.eval_loss < result.initial_eval_loss
    state = {name: p.detach().clone() for name, p in mm.named_parameters() if p.requires_grad}
    assert any(name.startswith("projection.") for name in state)
    resumed, _ = run(resume=str(tmp_path / "run" / "checkpoints" / "step_000002.pt"))
    for name, p in resumed.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, state[name]), name
    torch.manual_seed(0)
    loaded = load_multimodal_adapter(LlamaModel(char_config), tmp_path / "run" / "adapter.safetensors", tower_dir)
    torch.testing.assert_close(loaded.projection.linear.weight, state["projection.linear.weight"])


def test_image_data_without_a_vision_model_is_refused(tmp_path, shared_data, scienceqa, capsys):
    args = ["train", "--model", str(shared_data / "stories260K.bin"), "--data", str(scienceqa), "--out",
            str(tmp_path / "run")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "holds images" in err and "pass --vision-model DIR" in err


def test_eval_and_train_refuse_image_flags_that_do_not_fit(tmp_path, shared_data, scienceqa, capsys):
    from fastadapter.adapters import save_adapter
    from fastadapter.loaders import load_model

    model = add_adapter(load_model(shared_data / "stories260K.bin"), AdapterConfig(prompt_len=2, layers=1))
    text_only = tmp_path / "text.safetensors"
    save_adapter(model, text_only)
    tower = write_tower(tmp_path / "tower")
    common = ["eval", "--task", "scienceqa", "--model", str(shared_data / "stories260K.bin"), "--tokenizer",
              str(shared_data / "tok512.bin"), "--data", str(scienceqa)]
    assert cli_main(common + ["--adapter", str(text_only), "--vision-model", str(tower)]) == 2
    assert "text-only adapter (no image projection)" in capsys.readouterr().err
    assert cli_main(common + ["--limit", "0"]) == 2
    assert "--limit must be positive" in capsys.readouterr().err
    assert cli_main(common + ["--max-seq-len", "513"]) == 2  # past the 512 positions of stories260K
    assert "--max-seq-len (513) exceeds the model's max_seq_len (512" in capsys.readouterr().err
    assert cli_main(["train", "--model", str(shared_data / "stories260K.bin"), "--data",
                     str(shared_data / "alpaca_tiny.json"), "--out", str(tmp_path / "r"), "--fusion", "early"]) == 2
    assert "--fusion configures the image features: it needs --vision-model" in capsys.readouterr().err
