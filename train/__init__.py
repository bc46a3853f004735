"""Training side: the Transformer model, tokenizer, data pipeline and training loop (needs torch)."""
