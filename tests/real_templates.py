"""Chat templates as the real models ship them, loaded into one small byte-level BPE tokenizer.

Every original template shipped with TRL, plus format-equivalent copies of Zephyr (the paper's recipe file),
Mistral-Instruct v0.1, ChatML (Yi) and Llama 2. Each is given its family's bos/eos and its special tokens as
special tokens, so tokenization splits where the real models' tokenizers do.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import trl
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
# Templates whose rendering needs images; none of the shipped ones does (text-only conversations render
# through the vision-language templates too, as a list of text parts where they expect one).
NEEDS_IMAGES: set[str] = set()
ORIGINAL = sorted(p.stem for p in TRL_TEMPLATES.glob("*.jinja") if not p.stem.endswith("_training"))

ZEPHYR = (Path(__file__).parents[1] / "recipes" / "templates" / "zephyr.jinja").read_text()
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
CHATML_YI = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
WRITTEN = {"zephyr": ZEPHYR, "mistral_v0.1": MISTRAL_V01, "chatml_yi": CHATML_YI, "llama2": LLAMA2}

# Special tokens as the real tokenizers mark them: <|...|>, <|...>, <...|>, DeepSeek's <｜...｜> and Gemma's.
SPECIAL = re.compile(
    r"<\|[^<>\s|]*\|>|<\|[^<>\s|]+>|<[^<>\s|]+\|>|<｜[^｜]+｜>"
    r"|<(?:start_of_turn|end_of_turn|end_of_utterance|start_of_image|sop)>"
)
# bos and eos of each family's tokenizer, which templates reach through bos_token / eos_token.
BOS_EOS = {
    "llama": ("<|begin_of_text|>", "<|eot_id|>"),
    "gemma": ("<bos>", "<eos>"),
    "diffusion": ("<bos>", "<eos>"),
    "phi": ("<s>", "<|endoftext|>"),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "qwen": ("<|endoftext|>", "<|im_end|>"),
    "idefics": ("<|begin_of_text|>", "<end_of_utterance>"),
    "glm": ("[gMASK]", "<|endoftext|>"),
    "cohere": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    "lfm": ("<|startoftext|>", "<|im_end|>"),
    "nemotron": ("<s>", "<|im_end|>"),
    "gptoss": ("<|startoftext|>", "<|return|>"),
    "chatml": ("<|startoftext|>", "<|im_end|>"),
}


def template_text(name: str) -> str:
    return WRITTEN[name] if name in WRITTEN else (TRL_TEMPLATES / f"{name}.jinja").read_text()


def tokenizer_for(base, name: str):
    text = template_text(name)
    bos, eos = BOS_EOS.get(re.match(r"[a-z]+", name).group(), ("<s>", "</s>"))
    tokenizer = copy.deepcopy(base)
    tokenizer.add_special_tokens(
        {"bos_token": bos, "eos_token": eos, "additional_special_tokens": sorted(set(SPECIAL.findall(text)) | {eos})}
    )
    tokenizer.chat_template = text
    return tokenizer


def sentencepiece_tokenizer(texts: list[str], legacy: bool) -> PreTrainedTokenizerFast:
    """A byte-fallback BPE in sentencepiece's style, as Llama 2, Mistral, Zephyr, Yi and Gemma ship it: `legacy`
    marks spaces in the normalizer and prepends one to each text piece (older tokenizer.json files); otherwise a
    metaspace pre-tokenizer prepends only at the start of the text (newer ones)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if legacy:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    backend.train_from_iterator(
        texts, trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
