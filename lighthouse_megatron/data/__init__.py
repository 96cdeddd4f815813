"""Training data: `lighthouse-megatron prepare-data` (text into Megatron indexed datasets),
the byte-level vocabulary and megatron-core's NullTokenizer for it, and the checked reader
of an indexed dataset (`prepare`)."""

from .prepare import (
    BYTE_EOD,
    BYTE_VOCAB_SIZE,
    DataError,
    Summary,
    add_prepare_data_parser,
    byte_vocab_size,
    default_inputs,
    expand_inputs,
    format_summary,
    null_tokenizer,
    open_indexed_dataset,
    prepare_data,
)

__all__ = ["BYTE_EOD", "BYTE_VOCAB_SIZE", "DataError", "Summary", "add_prepare_data_parser",
           "byte_vocab_size", "default_inputs", "expand_inputs", "format_summary", "null_tokenizer",
           "open_indexed_dataset", "prepare_data"]
