"""Data: batches, the synthetic teacher, speech corpora, alignment."""
