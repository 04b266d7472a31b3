"""Data preparation: scripts that write llm.c's token shards and tokenizer file under data/.
Run them from the repository root, as files or as modules: `python prepro/fineweb.py` or
`python -m prepro.fineweb`."""
