"""Multimodal LLaMA-Adapter: the frozen tiny CLIP tower (random weights, a local HF folder), multi-scale features,
the projection added to every adaption prompt (one prompt per sequence through the fused op, packed or batched),
zero gates = the base model whatever the image, rows without an image = the plain prompts, gradients to the
projection and prompts only, the projection's feature standardisation (issue 12), early fusion, adapter files with
the projection and a wrong tower refused, and generation conditioned on an image (KV cache, prompts of different
lengths)."""
import numpy as np
import pytest
import torch

from fastadapter.adapters import AdapterConfig, add_adapter, load_adapter, save_adapter
from fastadapter.model import LlamaModel
from fastadapter.adapters.adapter import adapted_layers
from fastadapter.adapters.adapter_file import AdapterFileError
from fastadapter.model.generation import generate
from fastadapter.vision import (MultimodalLlama, VisionTower, VisionTowerError, VisualPromptConfig, add_vision,
                                default_feature_layers, generate_with_images, load_multimodal_adapter,
                                save_multimodal_adapter)

from hf_folders import write_tower


@pytest.fixture(scope="module")
def config(make_config):
    """Head dim 80 (dim 160, 2 query heads, 1 kv head: GQA), 3 layers of which the top 2 are adapted, prompt 5."""
    return make_config(dim=160, n_layers=3, n_heads=2, n_kv_heads=1, hidden_dim=96, max_seq_len=128)


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    return write_tower(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def other_tower_dir(tmp_path_factory):
    return write_tower(tmp_path_factory.mktemp("other-clip"), seed=1)


def images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (11, 13, 3), dtype=np.uint8) for _ in range(count)]


@pytest.fixture
def multimodal(config, tower_dir):
    """``multimodal(gates=0.0, fusion="all", early_layers=1, seed=0)``: the model of ``config`` adapted (top 2
    layers, prompt 5, every gate at ``gates``) with the tiny tower's layers 1 and 3 (the same weights for the same
    seed)."""
    def build(*, gates=0.0, fusion="all", early_layers=1, seed=0) -> MultimodalLlama:
        torch.manual_seed(seed)
        model = add_adapter(LlamaModel(config), AdapterConfig(prompt_len=5, layers=2))
        with torch.no_grad():
            for adapter in adapted_layers(model).values():
                adapter.gate.fill_(gates)
        return add_vision(model, VisionTower.from_folder(tower_dir, layers=[1, 3]),
                          VisualPromptConfig(fusion=fusion, early_layers=early_layers))

    return build


@pytest.fixture
def packed(config):
    """``packed(lengths, seed=0)``: random tokens of ``config``'s vocabulary packed as sequences of ``lengths``,
    and their ``cu_seqlens``."""
    def build(lengths, seed=0):
        g = torch.Generator().manual_seed(seed)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        return torch.randint(0, config.vocab_size, (1, sum(lengths)), generator=g), cu

    return build


def test_default_feature_layers_are_evenly_spaced_and_end_at_the_last():
    assert default_feature_layers(12) == [3, 6, 9, 12]
    assert default_feature_layers(24) == [6, 12, 18, 24]
    assert default_feature_layers(3) == [1, 2, 3]


def test_tower_features_are_multiscale_cls_tokens_without_gradient(tower_dir):
    tower = VisionTower.from_folder(tower_dir, layers=[1, 3])
    pixels = tower.preprocess(images(2))
    assert pixels.shape == (2, 3, 16, 16)
    features = tower(pixels)
    assert features.shape == (2, 2 * 36) and not features.requires_grad
    hidden = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    expected = torch.cat([torch.nn.functional.layer_norm(hidden[i][:, 0], (36,)) for i in (1, 3)], -1)
    torch.testing.assert_close(features, expected)
    assert all(not p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.model.training  # frozen: stays in eval mode
    with pytest.raises(ValueError, match=r"distinct layer numbers in \[1, 3\]"):
        VisionTower.from_folder(tower_dir, layers=[0, 4])


def test_a_folder_without_a_preprocessor_config_is_a_clear_error(tmp_path, tower_dir):
    import shutil
    shutil.copytree(tower_dir, tmp_path / "t")
    (tmp_path / "t" / "preprocessor_config.json").unlink()
    with pytest.raises(VisionTowerError, match="no preprocessor_config.json"):
        VisionTower.from_folder(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="vision model folder not found"):
        VisionTower.from_folder(tmp_path / "missing")


def test_zero_gates_equal_the_base_model_whatever_the_image(multimodal, packed):
    mm = multimodal(gates=0.0)
    tokens, cu = packed([9, 23, 14])
    pixels = mm.tower.preprocess(images(2))
    base = mm.llama(tokens, cu_seqlens=cu)
    for index in ([0, 1, -1], [1, 0, 0]):
        out = mm(tokens, cu_seqlens=cu, pixel_values=pixels, image_index=torch.tensor(index))
        torch.testing.assert_close(out, base, rtol=0, atol=1e-5)


def test_each_sequence_gets_its_own_prompt_and_rows_without_an_image_the_plain_prompt(config, multimodal, packed):
    """Packed sequence n with image i computes what the model computes alone with prompt + proj(feature_i);
    a sequence without an image what it computes with the plain prompts."""
    mm = multimodal(gates=0.7)
    tokens, cu = packed([9, 23, 14])
    pixels = mm.tower.preprocess(images(2))
    out = mm(tokens, cu_seqlens=cu, pixel_values=pixels, image_index=torch.tensor([1, -1, 0]))
    offsets = mm.projection(mm.tower(pixels))  # [2, dim]
    bounds = cu.tolist()
    for n, image in enumerate([1, -1, 0]):
        alone = tokens[:, bounds[n]:bounds[n + 1]]
        if image < 0:
            expected = mm.llama(alone)
        else:
            reference = add_adapter(LlamaModel(config), AdapterConfig(prompt_len=5, layers=2))
            reference.load_state_dict(mm.llama.state_dict(), strict=False)
            with torch.no_grad():
                for i, adapter in adapted_layers(reference).items():
                    adapter.prompt.copy_(adapted_layers(mm.llama)[i].prompt + offsets[image])
                    adapter.gate.copy_(adapted_layers(mm.llama)[i].gate)
            expected = reference(alone)
        torch.testing.assert_close(out[:, bounds[n]:bounds[n + 1]], expected, rtol=1e-4, atol=1e-4)
    # The image matters once the gates are open, and the batched call matches the packed one.
    assert not torch.allclose(out[:, :9], mm.llama(tokens[:, :9]), atol=1e-3)
    batch = tokens[:, :9].repeat(2, 1)
    batched = mm(batch, pixel_values=pixels, image_index=torch.tensor([1, -1]))
    torch.testing.assert_close(batched[0], out[0, :9], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched[1], mm.llama(tokens[:, :9])[0], rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_projection_and_prompts_never_the_tower(multimodal, packed):
    mm = multimodal(gates=0.5)
    tokens, cu = packed([12, 17])
    out = mm(tokens, cu_seqlens=cu, pixel_values=mm.tower.preprocess(images(1)), image_index=torch.tensor([0, -1]))
    out.float().square().mean().backward()
    trainable = {name for name, p in mm.named_parameters() if p.requires_grad}
    assert trainable == {f"llama.layers.{i}.attention.adapter.{k}" for i in (1, 2) for k in ("prompt", "gate")} | \
        {"projection.linear.weight", "projection.linear.bias", "projection.norm.weight", "projection.norm.bias"}
    for name, p in mm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_early_fusion_conditions_only_the_lowest_adapted_layers(config, multimodal, packed):
    early = multimodal(gates=0.6, fusion="early", early_layers=1)
    assert early.fused_layers == [1]
    assert multimodal(fusion="all").fused_layers == [1, 2]
    tokens, cu = packed([10, 8])
    pixels = early.tower.preprocess(images(1))
    offsets = early.prompt_offsets(pixels, torch.tensor([0, -1]))
    assert sorted(offsets) == [1] and offsets[1].shape == (2, 1, config.dim)
    assert not offsets[1][1].any()  # the sequence without an image: a zero offset
    full = early(tokens, cu_seqlens=cu, pixel_values=pixels, image_index=torch.tensor([0, -1]))
    all_layers = add_vision(early.llama, early.tower)
    all_layers.projection.load_state_dict(early.projection.state_dict())
    assert not torch.allclose(full, all_layers(tokens, cu_seqlens=cu, pixel_values=pixels,
                                               image_index=torch.tensor([0, -1])), atol=1e-4)
    with pytest.raises(ValueError, match="lowest 3 adapted layers, but the model adapts only 2"):
        multimodal(fusion="early", early_layers=3)


def test_calibration_standardises_the_features_so_that_images_differ_in_the_offsets(multimodal):
    """Issue 12: a frozen tower's global token is mostly image-independent (a random CLIP's CLS token varies
    between images by a few percent of its norm), so without standardising it the projected offsets of all images
    are one shared vector, and training learned the answer prior instead of the image (the digits demo answered
    the same letter for every image). Calibrated over images, each feature is zero-mean unit-variance and the
    offsets' image-dependent part is on the scale of the offsets themselves."""
    mm = multimodal()
    pixels = mm.tower.preprocess(images(32))
    features = mm.tower(pixels)

    def relative_spread():  # per-dimension std across images over the offsets' RMS
        with torch.no_grad():
            offsets = mm.projection(features)
        return float(offsets.std(0).mean() / offsets.pow(2).mean().sqrt())

    assert not mm.projection.calibrated
    before = relative_spread()
    assert mm.calibrate([pixels[:20], pixels[20:]]) == 32
    assert mm.projection.calibrated
    standardised = (features - mm.projection.feature_mean) / mm.projection.feature_std
    torch.testing.assert_close(standardised.mean(0), torch.zeros(features.shape[1]), rtol=0, atol=1e-4)
    torch.testing.assert_close(standardised.std(0, unbiased=False), torch.ones(features.shape[1]), rtol=0,
                               atol=1e-3)
    after = relative_spread()
    assert before < 0.3 and after > 0.8, (before, after)
    # Only the input statistics changed: zero gates still give the base model, and the buffers do not train.
    assert {name for name, p in mm.named_parameters() if p.requires_grad} >= {"projection.linear.weight"}
    assert not any("feature_" in name for name, _ in mm.named_parameters())
    with pytest.raises(ValueError, match="at least 2 images"):
        mm.projection.calibrate(features[:1])
    with pytest.raises(ValueError, match=r"features must be \[M, 72\]"):
        mm.projection.calibrate(features[:, :10])


def test_prompt_offsets_are_checked(config, packed):
    model = add_adapter(LlamaModel(config), AdapterConfig(prompt_len=5, layers=2))
    tokens, cu = packed([5, 6])
    with pytest.raises(ValueError, match=r"prompt_offsets\[1\] must have shape \[2, 5 or 1, 160\]"):
        model(tokens, cu_seqlens=cu, prompt_offsets={1: torch.zeros(3, 1, config.dim)})
    with pytest.raises(ValueError, match="layer 0, which has no adapter"):
        model(tokens, cu_seqlens=cu, prompt_offsets={0: torch.zeros(2, 1, config.dim)})
    # A [N, P, dim] offset (one per prompt token) is accepted too, and zero offsets are the plain prompts.
    torch.testing.assert_close(model(tokens, cu_seqlens=cu, prompt_offsets={2: torch.zeros(2, 5, config.dim)}),
                               model(tokens, cu_seqlens=cu), rtol=0, atol=1e-5)


def test_adapter_file_holds_the_projection_and_refuses_another_tower(tmp_path, tower_dir, other_tower_dir, config,
                                                                     multimodal, packed):
    mm = multimodal(gates=0.4, fusion="early", early_layers=2)
    with torch.no_grad():
        mm.projection.linear.bias.normal_()
    mm.calibrate([mm.tower.preprocess(images(8, seed=3))])
    path = tmp_path / "adapter.safetensors"
    save_multimodal_adapter(mm, path)
    tokens, cu = packed([7, 11])
    pixels = mm.tower.preprocess(images(2))
    index = torch.tensor([1, 0])
    expected = mm(tokens, cu_seqlens=cu, pixel_values=pixels, image_index=index)

    torch.manual_seed(0)
    fresh = LlamaModel(config)
    fresh.load_state_dict({k: v for k, v in mm.llama.state_dict().items() if "adapter" not in k}, strict=False)
    loaded = load_multimodal_adapter(fresh, path, tower_dir)
    assert loaded.tower.layers == [1, 3] and loaded.visual_config == mm.visual_config
    # The feature statistics travel with the projection (without them the image offsets would be other ones).
    torch.testing.assert_close(loaded.projection.feature_mean, mm.projection.feature_mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded.projection.feature_std, mm.projection.feature_std, rtol=0, atol=0)
    torch.testing.assert_close(loaded(tokens, cu_seqlens=cu, pixel_values=pixels, image_index=index), expected)

    # A file written before the projection standardised its input (no statistics) loads with the identity ones.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    older = tmp_path / "older.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if "feature_" not in k}, str(older), metadata)
    old = load_multimodal_adapter(fresh, older, tower_dir)
    assert not old.projection.calibrated
    with torch.no_grad():
        mm.projection.feature_mean.zero_()
        mm.projection.feature_std.fill_(1.0)
    torch.testing.assert_close(old(tokens, cu_seqlens=cu, pixel_values=pixels, image_index=index),
                               mm(tokens, cu_seqlens=cu, pixel_values=pixels, image_index=index))

    with pytest.raises(VisionTowerError, match="another vision tower of the same shape"):
        load_multimodal_adapter(fresh, path, other_tower_dir)
    wider = write_tower(tmp_path / "wider", hidden=44)
    with pytest.raises(VisionTowerError, match="hidden_size=36, but .* has hidden_size=44"):
        load_multimodal_adapter(fresh, path, wider)
    # The text part alone still loads as a plain adapter; a text-only adapter is no multimodal one.
    load_adapter(fresh, path)
    text_only = tmp_path / "text.safetensors"
    save_adapter(fresh, text_only)
    with pytest.raises(AdapterFileError, match="no image projection"):
        load_multimodal_adapter(fresh, text_only, tower_dir)


def test_generation_with_images_matches_the_full_forward(multimodal):
    """Greedy decoding with the KV cache (per-sequence prefix K/V kept from the prefill, rows of different
    lengths decoded in groups) gives the tokens that a full forward with the same image prompts picks."""
    mm = multimodal(gates=0.8)
    prompts = [[1, 5, 9, 33, 60], [1, 7, 8], [1, 40, 41, 42]]
    pictures = [images(1, seed=3)[0], None, images(1, seed=4)[0]]
    out = generate_with_images(mm, prompts, pictures, max_new_tokens=3)
    pixels = mm.tower.preprocess([pictures[0], pictures[2]])
    for row, prompt in enumerate(prompts):
        sequence = list(prompt)
        index = torch.tensor([[0, -1, 1][row]])
        for _ in range(3):
            logits = mm(torch.tensor([sequence]), pixel_values=pixels, image_index=index)
            sequence.append(int(logits[0, -1].argmax()))
        assert out[row] == sequence[len(prompt):], row
    assert out[1] == generate(mm.llama, [prompts[1]], max_new_tokens=3)[0]  # no image: the plain adapter
    with pytest.raises(ValueError, match="one image \\(or None\\) per prompt"):
        generate_with_images(mm, prompts, pictures[:2], max_new_tokens=2)
