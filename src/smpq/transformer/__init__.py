"""Models, data and value functions for post-training mixed precision of transformers.

- models: local Hugging Face loading (never downloads), quantizable nn.Linear layers, the
  layer groups fused kernels force to share one format, the packaged all-MiniLM-L6-v2.
- tiny_lm: a byte-level Llama-architecture LM trained here once (minutes), cached by hash.
- data: the Python standard library's sources split by file (train / calibration /
  validation / test), token blocks, and a docstring retrieval task for encoders.
- values: KL to the float model, perplexity, embedding cosine, retrieval agreement, and
  WeightSwapper to evaluate many weight assignments with one pointer swap each.

transformers is imported only inside functions that need it (extra: pip install 'smpq[llm]').
"""

from smpq.transformer.data import (
    SPLITS,
    RetrievalTask,
    corpus_summary,
    docstring_pairs,
    split_of,
    stdlib_corpus,
    stdlib_files,
    token_blocks,
)
from smpq.transformer.models import (
    DEFAULT_EXCLUDE,
    arch_of,
    convert_conv1d_,
    linear_layers,
    load_local,
    load_minilm,
    minilm_path,
    share_groups,
)
from smpq.transformer.tiny_lm import (
    ByteTokenizer,
    TinyLMConfig,
    build_tiny_lm,
    default_tiny_lm,
    train_tiny_lm,
)
from smpq.transformer.values import (
    EncoderReference,
    FloatReference,
    RetrievalReference,
    WeightSwapper,
    embed,
    embedding_cosine,
    encode_texts,
    encoder_reference,
    float_reference,
    kl_to_float,
    nll,
    perplexity,
    retrieval_agreement,
    retrieval_reference,
    retrieval_report,
)

__all__ = [
    "DEFAULT_EXCLUDE",
    "SPLITS",
    "ByteTokenizer",
    "EncoderReference",
    "FloatReference",
    "RetrievalReference",
    "RetrievalTask",
    "TinyLMConfig",
    "WeightSwapper",
    "arch_of",
    "build_tiny_lm",
    "convert_conv1d_",
    "corpus_summary",
    "default_tiny_lm",
    "docstring_pairs",
    "embed",
    "embedding_cosine",
    "encode_texts",
    "encoder_reference",
    "float_reference",
    "kl_to_float",
    "linear_layers",
    "load_local",
    "load_minilm",
    "minilm_path",
    "nll",
    "perplexity",
    "retrieval_agreement",
    "retrieval_reference",
    "retrieval_report",
    "share_groups",
    "split_of",
    "stdlib_corpus",
    "stdlib_files",
    "token_blocks",
    "train_tiny_lm",
]
