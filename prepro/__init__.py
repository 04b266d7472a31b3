"""Data preparation: scripts that write llm.c's token shards and tokenizer file under data/.
Run them from the repository root as modules, e.g. `python -m prepro.gpt2_tokenizer`."""
