"""HellaSwag's validation set (10,042 examples) as llm.c's eval file, which `train_gpt2.py -h 1` reads.

Each example of the public hellaswag_val.jsonl becomes a record of fileformats' HellaSwag format: its
position in the file as the index, the label, the GPT-2 tokens of `ctx`, and each of the four endings
tokenized with a leading space (" " + ending, as a continuation of the context), as llm.c's
dev/data/hellaswag.py renders them.

    python prepro/hellaswag.py                   # data/hellaswag/hellaswag_val.jsonl -> hellaswag_val.bin
    python prepro/hellaswag.py --source val.jsonl
"""
import os
import sys

if __package__ in (None, ""):  # run as a file: the repository root on the path, as `python -m` puts it
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pathlib import Path

from cli import ArgumentParser, fail, output_folder, run
from fileformats import HellaSwagExample, write_hellaswag
from prepro.common import SourceError, jsonl_records, load_encoding, local_copy

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def read_examples(path, encoding):
    """The examples of a HellaSwag jsonl file, tokenized; a malformed line is a one-line error."""
    examples = []
    try:
        for lineno, record in jsonl_records(path):
            if not (isinstance(record, dict) and isinstance(record.get("ctx"), str)
                    and record.get("label") in (0, 1, 2, 3) and isinstance(record.get("endings"), list)
                    and len(record["endings"]) == 4 and all(isinstance(e, str) for e in record["endings"])):
                fail(f"{path}:{lineno}: expected a HellaSwag example: `ctx` text, `label` 0..3 and 4 `endings`")
            examples.append(HellaSwagExample(
                index=len(examples), label=record["label"], context=encoding.encode_ordinary(record["ctx"]),
                endings=[encoding.encode_ordinary(" " + ending) for ending in record["endings"]]))
    except SourceError as e:
        fail(str(e))
    if not examples:
        fail(f"{path}: no examples")
    return examples


def prepare(data_dir, source=None, url=URL):
    folder = Path(data_dir) / "hellaswag"
    if source is None:
        source = local_copy(url, folder / "hellaswag_val.jsonl")
    examples = read_examples(source, load_encoding())
    out = folder / "hellaswag_val.bin"
    with output_folder(folder):  # only now: a bad source leaves no empty folder
        try:
            write_hellaswag(out, examples)
        except ValueError as e:  # an example too long for the format's uint16 fields
            fail(f"{source}: {e}")
    print(f"wrote {out} ({len(examples):,} examples from {source})")
    return out


def main(argv=None):
    parser = ArgumentParser(description="HellaSwag val as llm.c's eval file, for train_gpt2.py -h 1.")
    parser.add_argument("-o", dest="data_dir", metavar="DATA_DIR", default="data", help="output folder")
    parser.add_argument("--source", metavar="PATH", help="a local hellaswag_val.jsonl instead of the download")
    parser.add_argument("--url", default=URL, help="where to download hellaswag_val.jsonl from")
    args = parser.parse_args(argv)
    prepare(args.data_dir, args.source, args.url)


if __name__ == "__main__":
    run(main)
