"""The tiny Gemma 3 stand-in loads and generates like MedGemma 4B; the 4B config has its shape.

Everything here is in-process and CPU-only; the models have ~150k parameters, so the whole file
runs in a few seconds (most of it is importing transformers).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Gemma3ForConditionalGeneration,
)

from devstack.tiny_gemma import (
    BOI_TOKEN,
    END_OF_TURN_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    TINY_IMAGE_SIZE,
    TINY_MM_TOKENS_PER_IMAGE,
    build_tiny_gemma,
    medgemma_4b_config,
)

REPO = Path(__file__).resolve().parents[1]

TEXT_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a careful radiologist."},
    {"role": "user", "content": [{"type": "text", "text": "Is a chest X-ray safe?"}]},
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """HF_HUB_OFFLINE=1: huggingface_hub reads the variable once at import, so patch both."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield


@pytest.fixture(scope="module")
def mm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-mm"), multimodal=True, seed=0)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-text"), multimodal=False, seed=0)


def _image_message(text: str = "Describe the image.") -> list[dict[str, Any]]:
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": text}],
        }
    ]


def test_multimodal_folder_reloads_with_auto_classes(mm_dir: Path) -> None:
    config = AutoConfig.from_pretrained(mm_dir)
    assert type(config).__name__ == "Gemma3Config"
    assert config.mm_tokens_per_image == TINY_MM_TOKENS_PER_IMAGE
    processor = AutoProcessor.from_pretrained(mm_dir)
    assert type(processor).__name__ == "Gemma3Processor"
    tokenizer = AutoTokenizer.from_pretrained(mm_dir)
    model = AutoModelForImageTextToText.from_pretrained(mm_dir)
    assert isinstance(model, Gemma3ForConditionalGeneration)
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 250_000

    # Gemma's ids, and the image ids the model config points at.
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(BOI_TOKEN) == config.boi_token_index
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == config.image_token_index
    assert len(tokenizer) == config.text_config.vocab_size
    # Stops on <eos> and <end_of_turn>, as MedGemma's generation config does.
    eos = model.generation_config.eos_token_id
    assert eos == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)]
    # A plain encode gets one <bos>; byte-level BPE round-trips any text.
    text = "Fièvre 38.5 °C, SpO2 91% — ok?"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_matches_gemma3(mm_dir: Path, text_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    rendered = tokenizer.apply_chat_template(
        [
            *TEXT_MESSAGES,
            {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "Ok"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == (
        "<bos><start_of_turn>user\nYou are a careful radiologist.\n\nIs a chest X-ray safe?"
        "<end_of_turn>\n<start_of_turn>model\nYes.<end_of_turn>\n"
        "<start_of_turn>user\nOk<end_of_turn>\n<start_of_turn>model\n"
    )
    encoded = tokenizer.apply_chat_template(
        TEXT_MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    ids = encoded["input_ids"][0].tolist()
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
        )

    processor = AutoProcessor.from_pretrained(mm_dir)
    rendered = processor.apply_chat_template(
        _image_message(), tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "<bos><start_of_turn>user\n<start_of_image>Describe the image.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_text_model_generates(text_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    model = AutoModelForCausalLM.from_pretrained(text_dir)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    inputs = tokenizer.apply_chat_template(
        TEXT_MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    prompt_len = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert out.shape == (1, prompt_len + 16)
    again = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(out, again)
    assert isinstance(tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True), str)


def test_multimodal_text_only_and_image_generate(mm_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(mm_dir)
    model = AutoModelForImageTextToText.from_pretrained(mm_dir)
    image_token_id = model.config.image_token_index

    seen: list[torch.Size] = []

    def spy(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        assert isinstance(pixels, torch.Tensor)
        seen.append(pixels.shape)

    handle = model.model.vision_tower.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        text_inputs = processor.apply_chat_template(
            TEXT_MESSAGES,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        assert "pixel_values" not in text_inputs
        assert image_token_id not in text_inputs["input_ids"][0].tolist()
        n_text = text_inputs["input_ids"].shape[1]
        out = model.generate(**text_inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert out.shape == (1, n_text + 16)
        assert seen == []

        image_inputs = processor.apply_chat_template(
            _image_message(),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        ids = image_inputs["input_ids"][0].tolist()
        assert ids.count(image_token_id) == TINY_MM_TOKENS_PER_IMAGE
        assert image_inputs["pixel_values"].shape == (1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
        n_prompt = len(ids)
        out = model.generate(**image_inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert out.shape == (1, n_prompt + 16)
        # The image went through the vision tower exactly once (at prefill, not every step).
        assert seen == [torch.Size((1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))]
    finally:
        handle.remove()
    assert isinstance(processor.decode(out[0, n_prompt:], skip_special_tokens=True), str)


def test_same_seed_same_folder(tmp_path: Path) -> None:
    a = build_tiny_gemma(tmp_path / "a", multimodal=False, seed=3)
    b = build_tiny_gemma(tmp_path / "b", multimodal=False, seed=3)
    c = build_tiny_gemma(tmp_path / "c", multimodal=False, seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    # Building does not disturb the caller's random stream.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_gemma(tmp_path / "d", multimodal=False, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_eos_is_a_special_token(text_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    for token in (EOS_TOKEN, END_OF_TURN_TOKEN, BOI_TOKEN, IMAGE_TOKEN):
        ids = tokenizer(f"a{token}b", add_special_tokens=False).input_ids
        assert tokenizer.convert_tokens_to_ids(token) in ids  # never split into bytes


# --- MedGemma 4B's real shape, on the meta device (no memory, no weights) -------------------

# google/medgemma-4b-it and google/gemma-3-4b-it: 4,300,079,472 parameters (lm_head is tied).
MEDGEMMA_4B_PARAMS = 4_300_079_472


def test_medgemma_4b_config_shape_on_meta_device() -> None:
    config = medgemma_4b_config()
    text, vision = config.text_config, config.vision_config
    assert text.layer_types.count("full_attention") == 5
    assert [i for i, t in enumerate(text.layer_types) if t == "full_attention"] == [
        5,
        11,
        17,
        23,
        29,
    ]
    assert text.rope_parameters["full_attention"]["factor"] == 8.0
    assert text.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert text.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert (config.image_token_index, config.boi_token_index, config.eoi_token_index) == (
        262_144,
        255_999,
        256_000,
    )
    # 896 / 14 = 64 patches a side, pooled to 16 x 16 = 256 image tokens.
    assert ((vision.image_size // vision.patch_size) // 4) ** 2 == config.mm_tokens_per_image

    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    assert total == pytest.approx(4.3e9, rel=0.01)
    assert total == MEDGEMMA_4B_PARAMS

    shapes = {name: tuple(p.shape) for name, p in params.items()}
    lm = "model.language_model"
    assert shapes[f"{lm}.embed_tokens.weight"] == (262_208, 2560)
    for i in (0, 5, 33):
        layer = f"{lm}.layers.{i}"
        assert shapes[f"{layer}.self_attn.q_proj.weight"] == (8 * 256, 2560)
        assert shapes[f"{layer}.self_attn.k_proj.weight"] == (4 * 256, 2560)
        assert shapes[f"{layer}.self_attn.v_proj.weight"] == (4 * 256, 2560)
        assert shapes[f"{layer}.self_attn.o_proj.weight"] == (2560, 8 * 256)
        assert shapes[f"{layer}.self_attn.q_norm.weight"] == (256,)
        assert shapes[f"{layer}.mlp.gate_proj.weight"] == (10_240, 2560)
        assert shapes[f"{layer}.mlp.up_proj.weight"] == (10_240, 2560)
        assert shapes[f"{layer}.mlp.down_proj.weight"] == (2560, 10_240)
    assert f"{lm}.layers.34.mlp.up_proj.weight" not in shapes
    vt = "model.vision_tower.vision_model"
    vision_shapes = {k.replace(vt, "vt"): v for k, v in shapes.items() if "vision_tower" in k}
    assert sum(1 for k in vision_shapes if k.endswith("mlp.fc1.weight")) == 27
    patch = next(v for k, v in vision_shapes.items() if k.endswith("patch_embedding.weight"))
    assert patch == (1152, 3, 14, 14)
    position = next(v for k, v in vision_shapes.items() if k.endswith("position_embedding.weight"))
    assert position == (64 * 64, 1152)
    fc1 = next(v for k, v in vision_shapes.items() if k.endswith("layers.0.mlp.fc1.weight"))
    assert fc1 == (4304, 1152)
    assert shapes["model.multi_modal_projector.mm_input_projection_weight"] == (1152, 2560)
    # Tied output head: no separate lm_head parameter.
    assert "lm_head.weight" not in shapes
