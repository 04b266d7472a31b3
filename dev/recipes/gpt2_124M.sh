#!/usr/bin/env bash
# GPT-2 (124M) on FineWeb, 10B tokens: llm.c's published run (its scripts/run_gpt2_124M.sh).
# 6 * 124e6 * 10e9 = 7e18 FLOPs; 18,865 steps of 524,288 tokens = one epoch of the 10B sample's train
# shards; about 90 minutes on 8x H100 (llm.c: ~300 ms/step on 8x A100). llm.c's run ends at HellaSwag
# about 0.29-0.30 (OpenAI's GPT-2 124M: 0.294), its val loss below GPT-2 124M's 3.42 on this val split.
source "$(dirname "$0")/common.sh"

prepro_common
run "$PYTHON" prepro/fineweb.py -t classic -v 10B      # data/fineweb10B/: 1 val + ~100 train shards of 1e8 tokens

train_until_done log_gpt2_124M 18865 \
    -i "data/fineweb10B/fineweb_train_*.bin" -j "data/fineweb10B/fineweb_val_*.bin" \
    -e d12 -b 64 -t 1024 -d 524288 \
    -r 0 -z 1 -c 0.1 -l 0.0006 -q 0.0 -u 700 \
    -v 250 -s 20000 -g 144 -h 1 -n 5000
