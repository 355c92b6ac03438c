#!/usr/bin/env bash
# The rate-fidelity frontier of docs/results.md §9 (issue 21). Each stage is one resumable
# `fc-edge eval` (records appended per document / item), run through /work/slot when present.
# Usage: bash docs/results/frontier/run.sh STAGE    (STAGE: see the case below)
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=docs/results/frontier
CAL=${CAL:?set CAL to the klt calibration artifact (fc-edge calibrate --out DIR)}
DEV=${DEV:-../shared/texts/dev.txt}
SLOT=${SLOT:-$( [ -x /work/slot ] && echo /work/slot || echo )}
K="calibration=$CAL"
ppl() {  # name, per-token flag, codecs
  $SLOT .venv/bin/fc-edge eval --perplexity "$DEV" --limit 400 --max-tokens 512 --split-layer 1 \
    $2 --codecs "$3" --threads 1 --no-progress \
    --records "$OUT/$1.jsonl" --json "$OUT/$1.json"
}
REUSE=${REUSE:-}  # records of an earlier run whose uncompressed scores are reused (none)
acc() {  # name, codecs, [limit]
  $SLOT .venv/bin/fc-edge eval --split-layer 1 --codecs "$2" --threads 1 --no-progress \
    ${3:+--limit $3} ${REUSE:+--reuse $REUSE --reuse-settings none} \
    --records "$OUT/$1.jsonl" --json "$OUT/$1.json"
}
case "$1" in
  decode-base)   ppl decode_base --per-token "none,fp16,quant[bits=4,group_size=0],quant[bits=6,group_size=0],int8,rotated[bits=2],rotated[bits=3],rotated,rotated[bits=5]" ;;
  decode-spectral) ppl decode_spectral --per-token "none,fourier[ratio=4],fourier[ratio=8],fourier[ratio=16],topk[ratio=4],topk[ratio=8],topk[ratio=16]" ;;
  decode-capped) ppl decode_capped --per-token "none,klt[step=86,bits=1,$K],klt[step=104,bits=2,$K],klt[step=118,bits=3.2,$K]" ;;
  decode-klt)    ppl decode_klt --per-token "none,klt[bits=1,$K],klt[bits=2,$K],klt[bits=3.2,$K],klt[step=92,bits=4,$K],klt[step=110,bits=4,$K]" ;;
  prefill)       ppl prefill "" "none,rotated[bits=3],rotated,klt[bits=2,$K],klt[bits=3.2,$K]" ;;
  accuracy-klt)  acc accuracy_klt "none,klt[bits=3.2,$K]" "${LIMIT:-}" ;;
  accuracy-more) acc accuracy_more "none,klt[bits=2,$K],rotated[bits=3]" "${LIMIT:-}" ;;
  all)  # in order of what the targets need; accuracy staged (first N items of every task)
    for stage in decode-klt prefill decode-capped; do bash "$0" "$stage"; done
    for n in 30 100 300 600; do LIMIT=$n bash "$0" accuracy-klt; done
    LIMIT= bash "$0" accuracy-klt
    bash "$0" decode-base
    bash "$0" decode-spectral
    bash "$0" accuracy-more ;;
  *) echo "unknown stage $1"; exit 2 ;;
esac
