"""Data pipeline: raw text -> prepare (tokenize, shard) -> ShardSet -> selection -> sampler -> loader.

Owns everything between input files and the trainer's batches: input readers, tokenizers, shard
formats (mds, wds, megatron), the built-in corpus, data selection, the deterministic sampler and
the packing loader. It never imports `engine` (selection receives a model callable instead).
"""
