"""A word-level tokenizer shared by Teacher and Student (same tokens, so same attention map sizes).

Built with the `tokenizers` library: a WordLevel model over whitespace and
punctuation pre-tokens, wrapped as a ``transformers.PreTrainedTokenizerFast``
so that ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip.
Special tokens follow T5: ``<pad>`` = 0 (also the decoder start), ``</s>`` = 1
(appended to every encoded text), ``<unk>`` = 2, and ``<s>`` = 3 (the
beginning-of-sequence token BLIP's text decoder needs). Texts of the dataset
separate punctuation by spaces, so ``decode(encode(text))`` gives ``text`` back.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, UNK, BOS)


def build_tokenizer(texts: Iterable[str], min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word of ``texts`` seen ``min_frequency`` times.

    Words are numbered after the special tokens in order of decreasing frequency
    (ties alphabetically), so the same texts always give the same ids.
    """
    pre = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"build_tokenizer needs strings, got {type(text).__name__}: {text!r}")
        counts.update(word for word, _ in pre.pre_tokenize_str(text))
    words = sorted((w for w, c in counts.items() if c >= min_frequency and w not in SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    if not words:
        raise ValueError("build_tokenizer got no words (empty texts?)")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre
    core.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=BOS, model_max_length=128
    )
