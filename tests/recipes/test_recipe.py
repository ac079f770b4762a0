"""The fine-tuning recipe (:mod:`fastadapter.recipes.adapter_finetune`) runs from a settings object, without a
command line; ``fastadapter train`` only maps its flags to those settings."""
import dataclasses

import pytest

from fastadapter.cli import build_parser, flag_of
from fastadapter.adapters.adapter_file import adapter_file_kind
from fastadapter.recipes import adapter_finetune
from fastadapter.recipes.adapter_finetune import FinetuneSettings
from fastadapter.setting_error import SettingError
from fastadapter.training.data import file_fingerprint
from fastadapter.training.distributed import DistributedContext


def _settings(shared_data, out, **changes) -> FinetuneSettings:
    base = dict(model=str(shared_data / "stories260K.bin"), data=str(shared_data / "alpaca_tiny.json"), out=str(out),
                tokenizer=str(shared_data / "tok512.bin"), dtype="fp32", seed=0, fsdp=False,
                activation_checkpointing=False, adapter="v1", adapter_layers=2, prompt_len=3,
                gate_activation="tanh", gate_shape="head", quantize=None, template="alpaca", chat_template=None,
                on_bad_row="skip", eval_fraction=0.05, max_seq_len=128, vision_model=None, vision_layers=None,
                vision_pooling="cls", fusion="all", early_fusion_layers=1, split="train", batch_tokens=256,
                grad_accum=1, max_steps=1, epochs=1, lr=1e-2, warmup_steps=0, min_lr_ratio=0.1, weight_decay=0.0,
                grad_clip=1.0, eval_every=0, save_every=0, keep_checkpoints=1, progress=False)
    return FinetuneSettings(**{**base, **changes})


def test_the_recipe_trains_from_settings_alone(shared_data, tmp_path):
    settings = _settings(shared_data, tmp_path / "run")
    lines = []
    done = adapter_finetune.train(settings, DistributedContext(), data_file=file_fingerprint(settings.data),
                                  say=lines.append)
    assert done.result.steps == 1 and done.result.interrupted_by is None
    assert adapter_file_kind(done.adapter_path) == "v1" and not done.multimodal
    assert done.tokenizer_path == settings.tokenizer
    assert any(line.startswith("model: ") for line in lines) and any(line.startswith("data: ") for line in lines)


@pytest.mark.parametrize("changes, settings_named, words", [
    (dict(max_seq_len=10 ** 6), ("max_seq_len",), "max_seq_len (1000000) exceeds the model's max_seq_len"),
    (dict(batch_tokens=100), ("batch_tokens", "max_seq_len"), "batch_tokens (100) must be >= max_seq_len (128"),
    (dict(adapter_layers=0), ("adapter_layers",), "adapter_layers must be positive, got 0"),
])
def test_a_bad_setting_is_a_setting_error_named_in_the_recipes_words(shared_data, tmp_path, changes,
                                                                     settings_named, words):
    settings = _settings(shared_data, tmp_path / "run", **changes)
    with pytest.raises(SettingError) as caught:
        adapter_finetune.train(settings, DistributedContext(), data_file=file_fingerprint(settings.data))
    assert caught.value.settings == settings_named
    assert words in str(caught.value) and "--" not in str(caught.value)
    assert flag_of(settings_named[0]) in caught.value.render(flag_of)


def test_the_command_maps_every_flag_to_a_setting(shared_data, tmp_path):
    from fastadapter.commands.train import finetune_settings

    args = build_parser("train").parse_args(["train", "--model", "m.bin", "--data", "d.json", "--out", "o",
                                             "--warmup", "7", "--no-progress", "--vision-layers", "3,6"])
    settings = finetune_settings(args, "cpu")
    assert (settings.warmup_steps, settings.progress, settings.vision_layers, settings.dtype) == (7, False, [3, 6],
                                                                                                  "fp32")
    assert all(getattr(settings, f.name) is not dataclasses.MISSING for f in dataclasses.fields(settings))
