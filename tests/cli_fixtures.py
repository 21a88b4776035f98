"""Tiny models, tokenizers and data files for the CLI and config tests: those of ``amad init-example``.

Everything is built from configs (no downloads) and small enough to train a
few steps in well under a second; the code lives in :mod:`amad.cli.examples`.
"""

from amad.cli.examples import (  # noqa: F401  (re-exported for the tests)
    DE,
    EN,
    LABELS,
    WORDS,
    bert_config,
    bert_tokenizer,
    t5_config,
    t5_tokenizer,
    vit_config,
    write_image_classification,
    write_jsonl,
    write_seq2seq,
    write_text_classification,
    write_vqa,
)
