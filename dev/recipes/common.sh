# Shared by the gpt2_*.sh recipes (sourced, not run). Runs from the repository root.
#   PYTHON  the interpreter (default: .venv/bin/python when there is one, else python)
#   GPUS    processes, one per GPU on this machine (default: 8, as llm.c's runs)
#   DRY_RUN=1 prints each command instead of running it
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
GPUS=${GPUS:-8}

run() {
    if [ "${DRY_RUN:-0}" = 1 ]; then echo "$*"; else "$@"; fi
}

# The data every run needs besides its shards: the tokenizer (samples) and HellaSwag (-h 1).
prepro_common() {
    run "$PYTHON" prepro/gpt2_tokenizer.py
    run "$PYTHON" prepro/hellaswag.py
}

# train_until_done OUT_DIR STEPS FLAGS...: train with -y 1 until OUT_DIR/DONE_<STEPS> exists, so a
# crashed or stopped run goes on from its newest checkpoint (llm.c's scripts loop the same way); gives up
# after 20 attempts, since a run that fails at once would otherwise loop for ever.
train_until_done() {
    local out=$1 steps=$2
    shift 2
    local done_file
    done_file=$(printf "%s/DONE_%08d" "$out" "$steps")
    for attempt in $(seq 1 20); do
        if [ -f "$done_file" ]; then echo "$done_file exists: the run is complete"; return 0; fi
        run "$PYTHON" train_gpt2.py -pn "$GPUS" -o "$out" -x "$steps" -y 1 "$@" || true
        if [ "${DRY_RUN:-0}" = 1 ]; then return 0; fi
        sleep 1
    done
    echo "error: $done_file still missing after 20 attempts; see $out/main.log" >&2
    return 1
}
