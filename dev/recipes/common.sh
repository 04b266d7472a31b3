# Shared by the gpt2_*.sh recipes (sourced, not run). Runs from the repository root.
#   PYTHON  the interpreter (default: .venv/bin/python when there is one, else python)
#   GPUS    processes, one per GPU on this machine (default: 8, as llm.c's runs)
#   DRY_RUN=1 prints each command instead of running it, quoted so that it runs as printed when pasted
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
GPUS=${GPUS:-8}
ATTEMPTS=20

# One word as the shell reads it back: as it is when no character in it is special to the shell, else in
# single quotes (a glob such as data/..._train_*.bin must reach the trainer whole, not expanded by the shell).
quote() {
    if [[ $1 =~ ^[A-Za-z0-9_./:,+@%-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

run() {
    if [ "${DRY_RUN:-0}" = 1 ]; then
        local words=() word
        for word in "$@"; do words+=("$(quote "$word")"); done
        echo "${words[*]}"
    else
        "$@"
    fi
}

# The data every run needs besides its shards: the tokenizer (samples) and HellaSwag (-h 1).
prepro_common() {
    run "$PYTHON" prepro/gpt2_tokenizer.py
    run "$PYTHON" prepro/hellaswag.py
}

# train_until_done OUT_DIR STEPS FLAGS...: train with -y 1 until OUT_DIR/DONE_<STEPS> exists, so a run
# that was killed goes on from its newest checkpoint (llm.c's scripts loop the same way). A rank that dies
# is restarted by the trainer's own launcher (--max-restarts 20), which tells a death from a refusal: it
# exits 1 on bad input (flags, files: said in its one error line), on a failure a restart would meet
# again, or once its restarts are spent, and that ends the loop at once. What the loop retries is the
# trainer killed as a whole by a signal N (status 128 + N: the OOM killer's SIGKILL is 137), up to
# ATTEMPTS times, but for SIGINT (130): a Ctrl-C means stop.
train_until_done() {
    local out=$1 steps=$2
    shift 2
    local done_file status
    done_file=$(printf "%s/DONE_%08d" "$out" "$steps")
    for attempt in $(seq 1 "$ATTEMPTS"); do
        if [ -f "$done_file" ]; then echo "$done_file exists: the run is complete"; return 0; fi
        status=0
        run "$PYTHON" train_gpt2.py -pn "$GPUS" --max-restarts 20 -o "$out" -x "$steps" -y 1 "$@" || status=$?
        if [ "${DRY_RUN:-0}" = 1 ]; then return 0; fi
        if [ "$status" = 0 ] && [ ! -f "$done_file" ]; then
            echo "error: train_gpt2.py ended without writing $done_file; see $out/main.log" >&2
            return 1
        elif [ "$status" = 130 ]; then
            echo "train_gpt2.py was interrupted (status 130): not retried" >&2
            return 130
        elif [ "$status" != 0 ] && [ "$status" -le 128 ]; then
            echo "error: train_gpt2.py exited with status $status (its error is above): not retried, since a" \
                 "retry would meet it again; fix it and run the recipe again" >&2
            return 1
        elif [ "$status" != 0 ]; then
            echo "train_gpt2.py was killed by signal $((status - 128)) (status $status) in attempt $attempt of" \
                 "$ATTEMPTS" >&2
            sleep 1
        fi
    done
    if [ -f "$done_file" ]; then echo "$done_file exists: the run is complete"; return 0; fi
    echo "error: $done_file still missing after $ATTEMPTS attempts; see $out/main.log" >&2
    return 1
}
