"""A real (if tiny) tokenizer for test and zoo models.

Tiny MoE models built for tests, examples and the model zoo need a tokenizer
that behaves like the ones real checkpoints ship: a byte-level BPE (GPT-2 style,
the kind Qwen-MoE, OLMoE and DeepSeek use) wrapped in
``transformers.PreTrainedTokenizerFast``, so it saves, loads and tokenizes like
any Hugging Face tokenizer.  :func:`train_byte_bpe` trains one in well under a
second on a slice of the shipped corpus, with no download.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

#: The one special token: beginning/end of text, also used for padding.
EOS_TOKEN = "<|endoftext|>"


def train_byte_bpe(text: str, vocab_size: int) -> "PreTrainedTokenizerFast":
    """Train a byte-level BPE tokenizer on ``text`` and wrap it for transformers.

    The vocabulary holds the 256 byte symbols, the special token ``<|endoftext|>``
    (id 0; it is the bos, eos and pad token) and ``vocab_size - 257`` merges, so
    ``vocab_size`` must be at least 257.  Any string round-trips through
    ``encode``/``decode``.  Training is deterministic: the same text and size give
    the same vocabulary.  Used to give tiny test/zoo models a real tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    if not text:
        raise ValueError("cannot train a tokenizer on empty text")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
    )
