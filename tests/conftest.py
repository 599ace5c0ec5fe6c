"""Shared fixtures. ``tiny_llama_dir`` / ``tiny_llama_chat_dir``: a random 2-layer LLaMA with a
byte-level BPE tokenizer trained on the spot, saved with ``save_pretrained``: a real model
folder that loads in well under a second, so engine tests need no download."""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")   # before torch is imported anywhere

import pytest

# the `slurm_cluster` fixture: one private single-node SLURM cluster per session
pytest_plugins = ["conftest_slurm", "conftest_hub"]  # + `hub`: the local Hub server

SUBJECTS = ["a red car", "two dogs", "a wooden table", "the Eiffel Tower", "a bowl of soup",
            "an old man", "a mountain lake", "a pair of shoes", "a vintage poster", "a cat"]
PLACES = ["on the street", "in a park", "at night", "near the sea", "in the kitchen",
          "on a white background", "in Paris", "under the snow"]
EXTRAS = ["for sale", "HD wallpaper", "stock photo", "2019 model", "| Free Shipping",
          "(detail)", "- IMG_0423.jpg", "#travel"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
                 "{% endif %}")


def caption_corpus() -> list[str]:
    """A few hundred caption-like strings plus the fusion prompt's own words."""
    from capsfus.prompt import INSTRUCTION_LINES
    lines = [f"{s} {p} {e}" for s, p, e in itertools.product(SUBJECTS, PLACES, EXTRAS)]
    lines += [f"There is {s} {p}." for s, p in itertools.product(SUBJECTS, PLACES)]
    lines += list(INSTRUCTION_LINES) + ["Sentence 1: Sentence 2: New Sentence:"]
    return lines


def build_tiny_llama(folder, chat_template: str | None = None) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(caption_corpus(), trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", model_max_length=512)
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.5, bos_token_id=bos,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_chat_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-chat")
    build_tiny_llama(folder, CHAT_TEMPLATE)
    return folder
