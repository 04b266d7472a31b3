#!/usr/bin/env bash
# GPT-2 (774M) on FineWeb, ~150B tokens: llm.c's published run (its scripts/run_gpt2_774M.sh).
# 6 * 774e6 * 150e9 = 7e20 FLOPs (10x the 350M); 286,102 steps of 524,288 tokens, one and a half epochs
# of the 100B sample; llm.c: ~1.7 s/step on 8x A100, about 5.6 days.
source "$(dirname "$0")/common.sh"

prepro_common
run "$PYTHON" prepro/fineweb.py -t classic -v 100B     # data/fineweb100B/: ~1000 shards of 1e8 tokens

train_until_done log_gpt2_774M 286102 \
    -i "data/fineweb100B/fineweb_train_*.bin" -j "data/fineweb100B/fineweb_val_*.bin" \
    -e d36 -b 32 -t 1024 -d 524288 \
    -r 0 -z 1 -c 0.1 -l 0.00025 -q 0.0 -u 700 \
    -v 250 -s 300000 -g 144 -h 1 -n 4000
