"""The model matrix: tiny random-weight models of the real architectures with tokenizers whose chat templates
behave like the real families', each written as a local directory that ``--model_name_or_path`` takes
exactly as it would take a downloaded model.

Nothing here is downloaded or copied: the templates are written from each family's documented behaviour,
the byte-level BPE vocabulary is the sample world's bundled tokenizer (so the sample world tokenises well),
and the SentencePiece-style vocabulary of the Mistral family is trained here on the sample world.

| family       | architecture        | template behaviour                                          | embedding rows    |
|--------------|---------------------|-------------------------------------------------------------|-------------------|
| qwen2.5      | Qwen2, untied       | ChatML, default system prompt injected into every rendering | spare rows (x128) |
| qwen3        | Qwen3, tied         | ChatML, no default system; ``<think>`` block on the last     | = tokenizer       |
|              |                     | assistant turn after the last user turn                     |                   |
| llama3       | Llama, untied       | BOS + header tokens + ``<|eot_id|>``, a system block with   | = tokenizer       |
|              |                     | the knowledge-date lines always; tokenizer adds BOS too     |                   |
| llama3-tied  | Llama, tied         | as llama3                                                   | = tokenizer       |
| mistral      | Mistral             | ``<s>[INST] ..[/INST] ..</s>``, strict user/assistant        | = tokenizer       |
|              |                     | alternation (raises otherwise), Metaspace vocabulary         |                   |
| mistral-v0.1 | Mistral             | v0.1's ``<s>[INST] .. [/INST]..</s> `` with ``[INST]`` /    | = tokenizer       |
|              |                     | ``[/INST]`` written as plain text (as Mistral v0.1 / v0.2   |                   |
|              |                     | and Llama-2-chat write them), byte-level vocabulary, no     |                   |
|              |                     | system role, tokenizer adds BOS                             |                   |

``build_family(name, directory)`` writes one; ``FAMILIES`` lists the names. Building takes well under a second
per family except mistral (trains its vocabulary: a few seconds).
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from convret.data.sample_world import COLLECTION, SAMPLE_WORLD_DIR, TOKENIZER_DIR

FAMILIES = ("qwen2.5", "qwen3", "llama3", "llama3-tied", "mistral", "mistral-v0.1")
#: families whose template refuses a system message (as Mistral-7B-Instruct-v0.1's does): no ``instruction``
NO_SYSTEM_ROLE = ("mistral-v0.1",)

# Qwen2 / Qwen2.5-Instruct: a default system message when the first message is not a system message
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3: no default system; the assistant turns after the last user turn carry a (possibly empty) think block
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query_index=messages|length - 1, found=false) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if not ns.found and message['role'] == 'user' %}"
    "{%- set ns.last_query_index = index %}{%- set ns.found = true %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Llama-3.1-Instruct: BOS, then always a system block with the knowledge-date lines (plus the system message)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Mistral-7B-Instruct (v0.2 / v0.3): BOS, strict alternation after an optional system message (merged into
# the last user message), raises on anything else
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Mistral-7B-Instruct-v0.1: the role markers are text ("[INST]" is not a token of its vocabulary), so a message's
# text is tokenized together with the markers around it; an assistant message ends with EOS and a space
MISTRAL_V01_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token + ' ' }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6)


def _byte_level_tokenizer(specials: list[str], bos: str | None, eos: str, pad: str | None, template: str,
                          add_bos: bool):
    """The sample world's byte-level BPE with a family's special tokens, BOS behaviour and template."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(Path(TOKENIZER_DIR) / "tokenizer.json"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    special = {"eos_token": eos}
    if bos is not None:
        special["bos_token"] = bos
    if pad is not None:
        special["pad_token"] = pad
    tokenizer.add_special_tokens(special)
    if add_bos:
        bos_id = tokenizer.convert_tokens_to_ids(bos)
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    tokenizer.chat_template = template
    tokenizer.model_max_length = 2048
    return tokenizer


def _sample_texts():
    with open(Path(SAMPLE_WORLD_DIR) / COLLECTION, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def _metaspace_tokenizer(template: str):
    """A SentencePiece-style (Metaspace, ``▁``) BPE trained on the sample world: ``<unk>`` 0, ``<s>`` 1,
    ``</s>`` 2 as in Llama-2 / Mistral, ``[INST]`` / ``[/INST]`` control tokens, BOS added by the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    # every printable character and the newline are in the alphabet (the real vocabulary covers them; a character
    # outside it would become <unk>)
    alphabet = [c for c in string.printable if c not in " \t\r\x0b\x0c"]
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=alphabet)
    backend.train_from_iterator(_sample_texts(), trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]})
    tokenizer.chat_template = template
    tokenizer.model_max_length = 2048
    return tokenizer


def family_tokenizer(name: str):
    """The tokenizer of a family (see the module table)."""
    if name in ("qwen2.5", "qwen3"):
        return _byte_level_tokenizer(["<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                                     pad="<|endoftext|>",
                                     template=QWEN25_TEMPLATE if name == "qwen2.5" else QWEN3_TEMPLATE,
                                     add_bos=False)
    if name in ("llama3", "llama3-tied"):
        # Llama-3 has no pad token; its tokenizer prepends <|begin_of_text|> on every call with special tokens
        return _byte_level_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "<|eot_id|>"], bos="<|begin_of_text|>",
                                     eos="<|eot_id|>", pad=None, template=LLAMA3_TEMPLATE, add_bos=True)
    if name == "mistral":
        return _metaspace_tokenizer(MISTRAL_TEMPLATE)
    if name == "mistral-v0.1":
        return _byte_level_tokenizer(["<s>", "</s>"], bos="<s>", eos="</s>", pad=None, template=MISTRAL_V01_TEMPLATE,
                                     add_bos=True)
    raise ValueError(f"unknown family {name!r}; one of {FAMILIES}")


def family_config(name: str, tokenizer):
    """A tiny config of the family's architecture sized to its tokenizer (spare rows for qwen2.5 only)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    rows = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if name == "qwen2.5":
        config = Qwen2Config(vocab_size=(rows // 128 + 1) * 128, tie_word_embeddings=False,
                             use_sliding_window=False, **ids, **_SMALL)
    elif name == "qwen3":
        config = Qwen3Config(vocab_size=rows, tie_word_embeddings=True, **ids, **_SMALL)
    elif name in ("llama3", "llama3-tied"):
        config = LlamaConfig(vocab_size=rows, tie_word_embeddings=name == "llama3-tied", rope_theta=500000.0,
                             **ids, **_SMALL)
    elif name in ("mistral", "mistral-v0.1"):
        config = MistralConfig(vocab_size=rows, tie_word_embeddings=False, sliding_window=None, **ids, **_SMALL)
    else:
        raise ValueError(f"unknown family {name!r}; one of {FAMILIES}")
    return config


def build_family(name: str, directory: str | Path, seed: int = 0) -> Path:
    """Write the family's tiny model (random weights, safetensors) and tokenizer to ``directory``."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    tokenizer = family_tokenizer(name)
    config = family_config(name, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
