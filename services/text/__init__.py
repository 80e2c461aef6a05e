"""Text processing for serving: incremental sentence splitting of streamed answers (``sentences``)."""

from services.text.sentences import SentenceSplitter, split_sentences

__all__ = ["SentenceSplitter", "split_sentences"]
