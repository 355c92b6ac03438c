#!/usr/bin/env bash
# Issue 22: the full-set figures again at the current code (wire format version 2), resumable.
#
#   bash docs/results/rescore.sh main      # rotated over all 8,939 items; none reused from main's old records
#   bash docs/results/rescore.sh others    # int8 again; none, fourier, topk reused from others' old records
#   bash docs/results/rescore.sh check     # the reuse's check: none, fourier, topk at the current code on
#                                          # the first 20 items of every task against the old records
#   bash docs/results/full_run.sh perplexity   # per-token perplexity, the 400 evaluation documents
#
# OLD (default /tmp/fc-edge-old) holds the records as they were before issue 22 (`git show
# 31852b5:docs/results/full/main.jsonl.xz | xz -d`, the same for others); OUT the new ones.
set -euo pipefail
cd "$(dirname "$0")/../.."
FC=${FC:-.venv/bin/fc-edge}
SHARED=${SHARED:-../shared}
OUT=${OUT:-docs/results/full}
OLD=${OLD:-/tmp/fc-edge-old}
TASKS=arc_challenge,arc_easy,commonsenseqa,cosmosqa,logiqa,openbookqa,piqa,qasc,siqa,winogrande
mkdir -p "$OLD" "$OUT"
for name in main others; do
  [ -f "$OLD/$name.jsonl" ] || git show "31852b5:docs/results/full/$name.jsonl.xz" | xz -d > "$OLD/$name.jsonl"
done

acc() {  # $1 codecs, $2 run name, $3 settings reused from the old records
  for lim in 100 400 1800; do
    nice -n 5 $FC eval --tasks "$TASKS" --data-dir "$SHARED/datasets" --split-layer 1 --codecs "$1" --ratio 8 \
      --limit "$lim" --threads 1 --no-progress --reuse "$OLD/$2.jsonl" --reuse-settings "$3" \
      --records "$OUT/$2.jsonl" --json "$OUT/$2.json" --out-dir "$OUT/$2" > "$OUT/$2.md"
  done
}

case "${1:-}" in
  main) acc none,rotated main none ;;
  others) acc 'none,int8,fourier[ratio=8],topk[ratio=8]' others 'none,fourier[ratio=8],topk[ratio=8]' ;;
  check)
    rm -f "$OLD/check.jsonl"
    $FC eval --tasks "$TASKS" --data-dir "$SHARED/datasets" --split-layer 1 \
      --codecs 'none,fourier[ratio=8],topk[ratio=8]' --limit 20 --threads 1 --no-progress \
      --records "$OLD/check.jsonl" > /dev/null
    .venv/bin/python docs/results/rescore_check.py "$OLD/check.jsonl" "$OLD/others.jsonl" ;;
  *) echo "usage: $0 main|others|check" >&2; exit 2 ;;
esac
