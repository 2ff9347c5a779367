"""A tiny, random-weight Gemma 3 that loads exactly like MedGemma 4B, built offline in a second.

No model hub is reachable from the machines this project is developed and tested on, and the real
MedGemma weights are gated, so tests and the local demo need a stand-in. :func:`build_tiny_gemma`
writes a folder that uses the *same classes* as ``google/medgemma-4b-it``
(``Gemma3ForConditionalGeneration`` + ``Gemma3Processor``, or ``Gemma3ForCausalLM`` + tokenizer
for the text-only variant), so a worker exercises the real loading, chat-template, image-expansion
and generation code paths; only the sizes differ (~190k parameters multimodal, ~140k text-only;
a 32 px image split into 16 patches and pooled into ``mm_tokens_per_image=4`` soft tokens).

Choices that are not obvious:

* The tokenizer is a byte-level BPE trained here with ``tokenizers`` on a small built-in corpus.
  Byte-level means any UTF-8 text round-trips, so no ``<unk>`` is needed. The special tokens take
  Gemma's ids for ``<pad>``/``<eos>``/``<bos>`` (0/1/2); the turn and image markers follow (3..7),
  which is why ``image_token_index`` is 7 here and 262144 in the real model. A ``<bos>`` is
  prepended by the post-processor, as Gemma's tokenizer does; the chat template also writes
  ``bos_token`` and ``apply_chat_template`` tokenizes without special tokens, so a chat prompt
  has exactly one. (As with the real model, passing an already-templated string to the
  processor *with* special tokens gives two.)
* ``Gemma3Processor`` reads ``boi_token``/``eoi_token``/``image_token`` off the tokenizer, so they
  are given as named ``extra_special_tokens``. The chat template is Gemma 3's own: a
  ``{"type": "image"}`` part becomes ``<start_of_image>``, which the processor expands into
  ``\\n\\n<start_of_image>`` + 4 x ``<image_soft_token>`` + ``<end_of_image>\\n\\n``.
* The generation config copies MedGemma's: it stops on ``<eos>`` *and* ``<end_of_turn>`` and
  samples by default (``do_sample=True, top_k=64, top_p=0.95``). Callers that want greedy output
  must say so, exactly as with the real model.
* Weights are saved in float32 (the real ones are bfloat16): float32 is exact and fast on any
  CPU, bfloat16 is slow on CPUs without native support. Pass ``dtype=`` when loading to test it.
* The model vocabulary is exactly the tokenizer's size (the real model pads 262145 to 262208).
* Every linear layer is at least 64 wide with widths divisible by 32, because bitsandbytes
  0.50's CPU NF4 path fails otherwise (``absmax.reshape(out, in // 64)`` for ``in < 64``;
  ``assert N % block_n == 0`` when repacking), so 4-bit loading on CPU works for text *and*
  images here. (The real SigLIP MLP width, 4304, trips the second check on CPU.)
* Two decoder layers, one ``sliding_attention`` (window 64) and one ``full_attention``, so both
  Gemma 3 attention kinds and their rope settings (10k local; 1M global with linear factor 8) run.

:func:`medgemma_4b_config` returns the exact shape of MedGemma 4B for meta-device checks and GPU
benchmarks with random weights (4,300,079,472 parameters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GenerationConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    is_torchvision_available,
)

from devstack.tiny_tokenizer import (
    BOI_TOKEN,
    BOS_TOKEN,
    END_OF_TURN_TOKEN,
    EOI_TOKEN,
    EOS_TOKEN,
    GEMMA3_CHAT_TEMPLATE,
    IMAGE_TOKEN,
    PAD_TOKEN,
    START_OF_TURN_TOKEN,
    TOKEN_IDS,
    make_tokenizer,
)

__all__ = [
    "BOI_TOKEN",
    "BOS_TOKEN",
    "EOI_TOKEN",
    "EOS_TOKEN",
    "END_OF_TURN_TOKEN",
    "GEMMA3_CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "START_OF_TURN_TOKEN",
    "TINY_IMAGE_SIZE",
    "TINY_MM_TOKENS_PER_IMAGE",
    "build_tiny_gemma",
    "medgemma_4b_config",
]

TINY_IMAGE_SIZE: Final = 32
TINY_MM_TOKENS_PER_IMAGE: Final = 4


def gemma3_rope_parameters() -> dict[str, dict[str, object]]:
    """Gemma 3 4B: global layers 1M theta with linear scaling x8, local layers 10k theta."""
    return {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }


def _gemma3_layer_types(num_layers: int) -> list[str]:
    """Gemma 3's pattern: five sliding-window layers, then one global layer, repeated."""
    return [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_layers)
    ]


def _tiny_text_config(vocab_size: int) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters=gemma3_rope_parameters(),
        max_position_embeddings=131_072,
        pad_token_id=TOKEN_IDS[PAD_TOKEN],
        bos_token_id=TOKEN_IDS[BOS_TOKEN],
        eos_token_id=[TOKEN_IDS[EOS_TOKEN], TOKEN_IDS[END_OF_TURN_TOKEN]],
        tie_word_embeddings=True,
    )


def _tiny_vision_config() -> SiglipVisionConfig:
    # 32 px / patch 8 = 4x4 patches; Gemma 3 average-pools them to 2x2 = mm_tokens_per_image.
    # Widths stay >= 64: bitsandbytes' CPU NF4 kernel fails on layers narrower than its block (64).
    return SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        vision_use_head=False,
    )


def _generation_config() -> GenerationConfig:
    """MedGemma's generation_config.json, with the tiny tokenizer's ids."""
    generation_config: Any = GenerationConfig  # its __init__ is untyped
    config: GenerationConfig = generation_config(
        bos_token_id=TOKEN_IDS[BOS_TOKEN],
        pad_token_id=TOKEN_IDS[PAD_TOKEN],
        eos_token_id=[TOKEN_IDS[EOS_TOKEN], TOKEN_IDS[END_OF_TURN_TOKEN]],
        do_sample=True,
        top_k=64,
        top_p=0.95,
    )
    return config


def _image_processor() -> object:
    """Gemma 3's image processor at the tiny size.

    transformers 5 has a torchvision-backed ``Gemma3ImageProcessor`` and a PIL-backed
    ``Gemma3ImageProcessorPil``; torchvision does not import beside this torch build, so the PIL
    one is used when the other is unavailable. Both save the same ``processor_config.json``, and
    ``AutoProcessor`` picks whichever backend the loading machine has.
    """
    kwargs: dict[str, Any] = {
        "size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,  # bilinear, as in MedGemma's preprocessor_config.json
        "do_pan_and_scan": False,
    }
    if is_torchvision_available():
        from transformers import Gemma3ImageProcessor

        return Gemma3ImageProcessor(**kwargs)
    from transformers import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(**kwargs)


def tiny_gemma_config(vocab_size: int = 1000) -> Gemma3Config:
    """The tiny multimodal config (the tokenizer built here has 1000 entries)."""
    return Gemma3Config(
        text_config=_tiny_text_config(vocab_size),
        vision_config=_tiny_vision_config(),
        mm_tokens_per_image=TINY_MM_TOKENS_PER_IMAGE,
        boi_token_index=TOKEN_IDS[BOI_TOKEN],
        eoi_token_index=TOKEN_IDS[EOI_TOKEN],
        image_token_index=TOKEN_IDS[IMAGE_TOKEN],
        tie_word_embeddings=True,
    )


def build_tiny_gemma(dest: Path, *, multimodal: bool = True, seed: int = 0) -> Path:
    """Write a tiny random-weight Gemma 3 model folder to ``dest`` and return ``dest``.

    ``multimodal=True`` gives ``Gemma3ForConditionalGeneration`` + ``Gemma3Processor`` (the
    MedGemma 4B classes); ``False`` gives ``Gemma3ForCausalLM`` + a tokenizer. The folder holds
    the model weights (float32 safetensors), config, generation config, tokenizer files, chat
    template and, when multimodal, the processor/image-processor config. The same ``seed`` gives
    the same weights and tokenizer.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model: PreTrainedModel
        if multimodal:
            model = Gemma3ForConditionalGeneration(tiny_gemma_config(vocab_size=len(tokenizer)))
        else:
            model = Gemma3ForCausalLM(_tiny_text_config(len(tokenizer)))
    finally:
        torch.random.set_rng_state(generator_state)
    model.train(False)  # = eval(); eval() is untyped
    model.generation_config = _generation_config()
    model.save_pretrained(dest, safe_serialization=True)

    if multimodal:
        processor = Gemma3Processor(
            image_processor=_image_processor(),
            tokenizer=tokenizer,
            chat_template=GEMMA3_CHAT_TEMPLATE,
            image_seq_length=TINY_MM_TOKENS_PER_IMAGE,
        )
        processor.save_pretrained(dest)
    else:
        tokenizer.save_pretrained(dest)
    _record_provenance(dest, multimodal=multimodal, seed=seed)
    return dest


def _record_provenance(dest: Path, *, multimodal: bool, seed: int) -> None:
    """A small marker file so a folder can be recognised as a generated stand-in, not a model."""
    info = {
        "built_by": "devstack.tiny_gemma.build_tiny_gemma",
        "multimodal": multimodal,
        "seed": seed,
        "weights": "random",
    }
    (dest / "tiny_gemma.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def medgemma_4b_config() -> Gemma3Config:
    """The exact architecture of ``google/medgemma-4b-it`` (= Gemma 3 4B), for random weights.

    Text: hidden 2560, 34 layers (5 sliding-window : 1 global), 8 query / 4 KV heads of dim 256,
    MLP 10240, vocab 262208, window 1024, rope 10k local / 1M global with linear factor 8.
    Vision: SigLIP so400m at 896 px, patch 14 (64x64 patches pooled to 16x16 = 256 tokens).
    """
    text = Gemma3TextConfig(
        vocab_size=262_208,
        hidden_size=2560,
        intermediate_size=10_240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=131_072,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        layer_types=_gemma3_layer_types(34),
        rope_parameters=gemma3_rope_parameters(),
        attention_bias=False,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=[1, 106],
        tie_word_embeddings=True,
    )
    vision = SiglipVisionConfig(
        hidden_size=1152,
        image_size=896,
        intermediate_size=4304,
        num_attention_heads=16,
        num_hidden_layers=27,
        patch_size=14,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=256,
        boi_token_index=255_999,
        eoi_token_index=256_000,
        image_token_index=262_144,
        tie_word_embeddings=True,
    )
