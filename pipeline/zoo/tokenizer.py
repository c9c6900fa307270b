"""A character-level tokenizer for the zoo, built locally with the `tokenizers` library.

Why characters: every zoo task is about individual letters and short made-up words, and one token per
character lets a model with a few thousand parameters learn reversal or sorting at all; a BPE vocabulary
would hide the letters inside merged tokens. The vocabulary is a fixed list, so the tokenizer does not
depend on the seed or on the corpus.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 :=+-?|()\n"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Return a transformers tokenizer with one token per character in `CHARACTERS`.

    A BPE model without merges splits text into characters; `decoders.Fuse` joins them back without the
    spaces a plain token join would add. No post-processor: lm-eval scores continuations by token counts,
    so nothing is added around the text.
    """
    vocab = {token: index for index, token in enumerate([PAD, EOS, UNK, *CHARACTERS])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )
