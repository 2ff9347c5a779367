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
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    is_torchvision_available,
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

PAD_TOKEN: Final = "<pad>"
EOS_TOKEN: Final = "<eos>"
BOS_TOKEN: Final = "<bos>"
START_OF_TURN_TOKEN: Final = "<start_of_turn>"
END_OF_TURN_TOKEN: Final = "<end_of_turn>"
BOI_TOKEN: Final = "<start_of_image>"
EOI_TOKEN: Final = "<end_of_image>"
IMAGE_TOKEN: Final = "<image_soft_token>"

# Order = ids: <pad>=0, <eos>=1, <bos>=2 as in Gemma; the rest follow.
_SPECIAL_TOKENS: Final = (
    PAD_TOKEN,
    EOS_TOKEN,
    BOS_TOKEN,
    START_OF_TURN_TOKEN,
    END_OF_TURN_TOKEN,
    BOI_TOKEN,
    EOI_TOKEN,
    IMAGE_TOKEN,
)
_IDS: Final = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}

TINY_IMAGE_SIZE: Final = 32
TINY_MM_TOKENS_PER_IMAGE: Final = 4
_VOCAB_TARGET: Final = 1000

# Gemma 3's chat template (as shipped with google/gemma-3-4b-it and google/medgemma-4b-it): a
# system message is folded into the first user turn, "assistant" is spelled "model", roles must
# alternate, and an image part is written as the processor's image placeholder (<start_of_image>).
GEMMA3_CHAT_TEMPLATE: Final = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Training text for the tiny BPE: everyday English plus clinical vocabulary, chat-style turns and
# digits, so typical test prompts tokenize into a handful of merged pieces rather than raw bytes.
_CORPUS: Final = (
    "Hello! How are you today? I am fine, thank you. What can I help you with?",
    "Please describe the image. The image shows a chest X-ray of an adult patient.",
    "The patient is a 54-year-old man with chest pain, shortness of breath and a cough.",
    "A 32-year-old woman presents with fever, headache and a stiff neck for two days.",
    "Blood pressure is 140/90 mmHg, heart rate 98 beats per minute, temperature 38.2 C.",
    "The lungs are clear on both sides. There is no pleural effusion or pneumothorax.",
    "The heart size is normal. The mediastinum is not widened. No acute findings.",
    "Findings: a small nodule in the right upper lobe. Impression: follow-up CT advised.",
    "Differential diagnosis includes pneumonia, pulmonary embolism and heart failure.",
    "Start antibiotics, give oxygen, and monitor oxygen saturation every four hours.",
    "Common symptoms of diabetes are thirst, frequent urination, fatigue and weight loss.",
    "Hypertension increases the risk of stroke, kidney disease and myocardial infarction.",
    "The skin lesion is a dark, irregular mole with uneven borders; a biopsy is recommended.",
    "Dermatology, radiology, pathology, ophthalmology and cardiology images are supported.",
    "This answer is for information only and is not a substitute for medical advice.",
    "Please consult a doctor or another qualified health professional.",
    "Summarize the report in one sentence. Explain the result in simple words.",
    "What is the normal range of hemoglobin? For adult men it is about 13 to 17 g/dL.",
    "The MRI of the brain shows no mass, no bleeding and no signs of acute infarction.",
    "Laboratory results: white blood cells 12.4, C-reactive protein 85, creatinine 1.1.",
    "The fracture of the left wrist is displaced and needs reduction and a cast.",
    "Allergies: penicillin. Medications: metformin 500 mg twice daily, aspirin 100 mg.",
    "The child has a rash, a sore throat and swollen lymph nodes in the neck.",
    "Ultrasound of the abdomen: the liver, gallbladder, pancreas and spleen are normal.",
    "You are a helpful medical assistant. Answer clearly, briefly and with care.",
    "The quick brown fox jumps over the lazy dog. One, two, three, four, five, six.",
    "Yes, no, maybe. Thank you very much. Good morning, good evening, good night.",
    "Is this serious? When should I see a doctor? How long will recovery take?",
    "Take the tablet with water after meals. Do not drive if you feel dizzy.",
    "The electrocardiogram shows sinus rhythm with no ST elevation or depression.",
    "Pain score 7 out of 10, worse at night, better with rest and paracetamol.",
    "The retina shows small hemorrhages and exudates consistent with diabetic retinopathy.",
    "Histology: invasive ductal carcinoma, grade 2, margins clear, lymph nodes negative.",
    "Vaccination, nutrition, exercise and sleep are important for good health.",
    "Respiratory rate 22, oxygen saturation 91 percent on room air, mild wheeze.",
    "Assessment and plan: admit to the ward, repeat blood tests tomorrow morning.",
    "The system is running. The request was received. The answer is being generated.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 20 50 100 250 500 1000 2025 3.5 0.25 75%.",
    "Punctuation and symbols: ( ) [ ] { } < > / \\ - _ + = * & % $ # @ ! ? : ; , . ' \"",
)


def _train_tokenizer() -> Tokenizer:
    """Byte-level BPE over :data:`_CORPUS`; the special tokens take ids 0..7 in listed order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_TARGET,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Several passes give pair counts that are far from tied, which keeps the merges stable.
    tok.train_from_iterator([line for _ in range(3) for line in _CORPUS], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, _IDS[BOS_TOKEN])],
    )
    for token, expected in _IDS.items():
        got = tok.token_to_id(token)
        if got != expected:  # pragma: no cover - a tokenizers behaviour change
            raise RuntimeError(f"special token {token} got id {got}, expected {expected}")
    return tok


def _make_tokenizer() -> PreTrainedTokenizerFast:
    fast: Any = PreTrainedTokenizerFast  # its __init__ is untyped
    tokenizer: PreTrainedTokenizerFast = fast(
        tokenizer_object=_train_tokenizer(),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={
            "boi_token": BOI_TOKEN,
            "eoi_token": EOI_TOKEN,
            "image_token": IMAGE_TOKEN,
        },
        padding_side="left",
        chat_template=GEMMA3_CHAT_TEMPLATE,
        model_max_length=131_072,
    )
    return tokenizer


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
        pad_token_id=_IDS[PAD_TOKEN],
        bos_token_id=_IDS[BOS_TOKEN],
        eos_token_id=[_IDS[EOS_TOKEN], _IDS[END_OF_TURN_TOKEN]],
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
        bos_token_id=_IDS[BOS_TOKEN],
        pad_token_id=_IDS[PAD_TOKEN],
        eos_token_id=[_IDS[EOS_TOKEN], _IDS[END_OF_TURN_TOKEN]],
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
        boi_token_index=_IDS[BOI_TOKEN],
        eoi_token_index=_IDS[EOI_TOKEN],
        image_token_index=_IDS[IMAGE_TOKEN],
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
    tokenizer = _make_tokenizer()
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
