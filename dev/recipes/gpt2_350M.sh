#!/usr/bin/env bash
# GPT-2 (350M) on FineWeb, ~31.5B tokens: llm.c's published run (its scripts/run_gpt2_350M.sh).
# 6 * 350e6 * 31.5e9 = 7e19 FLOPs (10x the 124M); 60,000 steps of 524,288 tokens from the 100B sample;
# llm.c: ~820 ms/step on 8x A100, about 14 hours.
source "$(dirname "$0")/common.sh"

prepro_common
run "$PYTHON" prepro/fineweb.py -t classic -v 100B     # data/fineweb100B/: ~1000 shards of 1e8 tokens

train_until_done log_gpt2_350M 60000 \
    -i "data/fineweb100B/fineweb_train_*.bin" -j "data/fineweb100B/fineweb_val_*.bin" \
    -e d24 -b 64 -t 1024 -d 524288 \
    -r 0 -z 1 -c 0.1 -l 0.0003 -q 0.0 -u 700 \
    -v 250 -s 100000 -g 144 -h 1 -n 2000
