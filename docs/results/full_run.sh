#!/usr/bin/env bash
# Full-set results of issue 12, resumable: run it again (same command) to continue where it
# stopped. Every item / document is appended to a records file as it is scored; each stage
# (a larger --limit per task) rewrites the JSON, tables and plots from all records so far, so
# a stopped run leaves usable partial results: the first N items of every task.
#
#   bash docs/results/full_run.sh accuracy     # none + rotated, then none + int8 + fourier + topk
#   bash docs/results/full_run.sh main         # only the first (none + rotated)
#   bash docs/results/full_run.sh others       # only the second (in a second process beside it)
#   bash docs/results/full_run.sh perplexity   # per-token perplexity, the 400 evaluation documents
#   (issue 22: docs/results/rescore.sh scored main and others again at the current code)
#
# OUT (default docs/results/full) holds the records (*.jsonl), the JSON and the tables.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-docs/results/full}
FC=${FC:-.venv/bin/fc-edge}
SHARED=${SHARED:-../shared}
THREADS=${THREADS:-1}   # torch threads per run (1 when two runs share 2 cores)
TASKS=arc_challenge,arc_easy,commonsenseqa,cosmosqa,logiqa,openbookqa,piqa,qasc,siqa,winogrande
mkdir -p "$OUT"

accuracy() {  # $1 codecs, $2 name
  for lim in 10 25 50 100 200 400 800 1800; do
    nice -n 10 $FC eval --tasks "$TASKS" --data-dir "$SHARED/datasets" --split-layer 1 --codecs "$1" --ratio 8 \
      --limit "$lim" --threads "$THREADS" --no-progress --records "$OUT/$2.jsonl" \
      --json "$OUT/$2.json" --out-dir "$OUT/$2" > "$OUT/$2.md"
  done
}

perplexity() {
  for lim in 100 400; do   # the evaluation part of the de-duplicated dev.txt (issue 22)
    nice -n 10 $FC eval --perplexity "$SHARED/texts/dev.txt" --documents evaluation --per-token \
      --max-tokens 512 --split-layer 1 --codecs 'none,int8,rotated,fourier[ratio=8],topk[ratio=8]' \
      --limit "$lim" --threads "$THREADS" --no-progress \
      --records "$OUT/ppl_per_token.jsonl" --json "$OUT/ppl_per_token.json" \
      --out-dir "$OUT/ppl_per_token" > "$OUT/ppl_per_token.md"
  done
}

case "${1:-accuracy}" in
  accuracy)
    accuracy none,rotated main                                   # decides the fidelity verdict
    accuracy 'none,int8,fourier[ratio=8],topk[ratio=8]' others ;;
  main) accuracy none,rotated main ;;
  others) accuracy 'none,int8,fourier[ratio=8],topk[ratio=8]' others ;;
  perplexity) perplexity ;;
  *) echo "usage: $0 accuracy|main|others|perplexity" >&2; exit 2 ;;
esac
