"""The tiny Gemma 3's tokenizer: Gemma's special tokens and chat template, and a byte-level BPE
trained at build time on a small clinical corpus (no download), so test prompts tokenize into
a handful of merged pieces rather than raw bytes. Used by :mod:`devstack.tiny_gemma`."""

from __future__ import annotations

from typing import Any, Final

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

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
TOKEN_IDS: Final = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}

VOCAB_SIZE: Final = 1000

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
        vocab_size=VOCAB_SIZE,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Several passes give pair counts that are far from tied, which keeps the merges stable.
    tok.train_from_iterator([line for _ in range(3) for line in _CORPUS], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, TOKEN_IDS[BOS_TOKEN])],
    )
    for token, expected in TOKEN_IDS.items():
        got = tok.token_to_id(token)
        if got != expected:  # pragma: no cover - a tokenizers behaviour change
            raise RuntimeError(f"special token {token} got id {got}, expected {expected}")
    return tok


def make_tokenizer() -> PreTrainedTokenizerFast:
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
