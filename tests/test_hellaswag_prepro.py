"""prepro/hellaswag.py on a small jsonl in HellaSwag's format: the eval file is llm.c's byte for byte
(packed here from the format's description and tiktoken's tokens), train_gpt2.py's reader takes it, and
a malformed example is one line with nothing written."""
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fileformats as ff
from fileformats import read_hellaswag
from prepro.gpt2_tokenizer import gpt2_encoding
from prepro.hellaswag import main

REPO = Path(__file__).resolve().parents[1]

EXAMPLES = [  # shaped as hellaswag_val.jsonl's lines, with their other fields
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "ctx": "[header] How to make crème brûlée [title] Heat the oven.", "label": 0,
     "endings": ["Whisk the yolks — slowly.", "東京 is far away.", "It's done 🙂", ""]},
    {"ind": 106, "ctx": "A woman is outside with a bucket and a dog.", "label": 2,
     "endings": ["The dog runs.", "She rinses the bucket off with soap and blow dry the dog's head.",
                 "She uses a hose to keep it from getting soapy.", "The woman climbs into the bath tub."]},
]


@functools.cache
def encoding():
    return gpt2_encoding()


def expected_file(examples):
    """llm.c's eval file from its description: 256 int32 header [20240522, 1, count, longest record in
    bytes]; per example the uint16 record 65535, its byte length, index, label, 4, context length and
    tokens, then each ending's length and tokens, the ending encoded with a leading space."""
    records = []
    for i, ex in enumerate(examples):
        context = encoding().encode_ordinary(ex["ctx"])
        record = [65535, 0, i, ex["label"], 4, len(context), *context]
        for ending in ex["endings"]:
            tokens = encoding().encode_ordinary(" " + ending)
            record += [len(tokens), *tokens]
        record[1] = 2 * len(record)
        records.append(record)
    header = np.zeros(256, "<i4")
    header[:4] = [20240522, 1, len(records), max(2 * len(r) for r in records)]
    return header.tobytes() + np.array([v for r in records for v in r], "<u2").tobytes()


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples), encoding="utf-8")
    return path


def test_the_eval_file_is_llm_c_s_byte_for_byte(tmp_path):
    source = write_jsonl(tmp_path / "hellaswag_val.jsonl", EXAMPLES)
    main(["-o", str(tmp_path / "data"), "--source", str(source)])
    out = tmp_path / "data" / "hellaswag" / "hellaswag_val.bin"
    assert out.read_bytes() == expected_file(EXAMPLES)
    examples = read_hellaswag(out)  # what train_gpt2.py -h 1 reads
    assert [ex.label for ex in examples] == [3, 0, 2]
    assert encoding().decode(list(examples[1].context) + list(examples[1].endings[1])) == \
        EXAMPLES[1]["ctx"] + " " + EXAMPLES[1]["endings"][1]


def test_the_download_is_kept_and_reused(tmp_path, capsys):
    source = write_jsonl(tmp_path / "web.jsonl", EXAMPLES)
    data = tmp_path / "data"
    main(["-o", str(data), "--url", source.as_uri()])
    assert (data / "hellaswag" / "hellaswag_val.jsonl").read_bytes() == source.read_bytes()
    source.unlink()
    main(["-o", str(data), "--url", source.as_uri()])
    assert "reusing" in capsys.readouterr().out
    assert (data / "hellaswag" / "hellaswag_val.bin").read_bytes() == expected_file(EXAMPLES)


@pytest.mark.parametrize("line, problem", [
    ('{"ctx": "x", "label": 4, "endings": ["a", "b", "c", "d"]}', "label` 0..3"),
    ('{"ctx": "x", "label": 1, "endings": ["a", "b", "c"]}', "4 `endings`"),
    ('{"label": 1, "endings": ["a", "b", "c", "d"]}', "`ctx` text"),
    ('{"ctx": "x", "label": 1, "endings": ', "not JSON"),
])
def test_a_malformed_example_is_one_line_naming_its_line_and_nothing_is_written(tmp_path, capsys, line, problem):
    source = tmp_path / "val.jsonl"
    source.write_text(json.dumps(EXAMPLES[0]) + "\n" + line + "\n")
    with pytest.raises(SystemExit) as info:
        main(["-o", str(tmp_path / "data"), "--source", str(source)])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{source}:2:" in err[0] and problem in err[0], err
    assert not (tmp_path / "data").exists()  # not even an empty folder


def test_an_unreachable_download_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["-o", str(tmp_path), "--url", (tmp_path / "missing.jsonl").as_uri()])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--source" in err[0], err
    assert not (tmp_path / "hellaswag").exists()  # not even an empty folder


def test_train_gpt2_h_1_reads_it_from_its_default_path(tmp_path):
    # the default place prepro/hellaswag.py writes is the one train_gpt2.py -h 1 reads, relative to the root
    main(["-o", str(tmp_path / "data"), "--source", str(write_jsonl(tmp_path / "val.jsonl", EXAMPLES))])
    rng = np.random.default_rng(0)
    ff.write_shard(tmp_path / "train.bin", rng.integers(0, 50257, 2000))
    ff.write_shard(tmp_path / "val.bin", rng.integers(0, 50257, 600))
    result = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), "-e", "d2", "-b", "4", "-t", "64", "-x", "1",
                             "-h", "1", "-v", "1", "-m", "1", "-s", "0", "-i", "train.bin", "-j", "val.bin",
                             "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HellaSwag: " in result.stdout and " of 3" in result.stdout, result.stdout
