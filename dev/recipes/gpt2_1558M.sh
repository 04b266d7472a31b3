#!/usr/bin/env bash
# GPT-2 (1558M) on FineWeb-Edu, 32B tokens: llm.c's own run (its scripts/run_gpt2_1558M.sh).
# 6 * 1558e6 * 32e9 = 3e20 FLOPs; 32,000 steps of 1,048,576 tokens from the Edu 100B sample, cosine
# decay to 10% of the peak; llm.c: 2.8 s/step on 8x H100, about 24 hours. For comparison, OpenAI's
# GPT-2 1.5B scores 0.489 on HellaSwag by llm.c's scoring (-h 1).
source "$(dirname "$0")/common.sh"

prepro_common
run "$PYTHON" prepro/fineweb.py -t edu -v 100B         # data/edu_fineweb100B/: ~1000 shards of 1e8 tokens

train_until_done log_gpt2_1558M 32000 \
    -i "data/edu_fineweb100B/edu_fineweb_train_*.bin" -j "data/edu_fineweb100B/edu_fineweb_val_*.bin" \
    -e d48 -b 16 -t 1024 -d 1048576 \
    -r 0 -z 1 -c 0.1 -k cosine -l 0.0006 -q 0.1 -u 700 \
    -v 250 -s 300000 -g 384 -h 1 -n 2000 -ge 1
