"""`fc-edge eval` throughput, old path vs new, side by side on the same items (make bench).

The old path runs every choice's whole sequence through all layers, item by item
(``shared_context=False``, the code before issue 12); the new one scores ``--batch-items`` items
together, each item's shared context once as a packed tree whose branches are the choices, in
forward batches of ``--batch-tokens`` rows. Both run here in alternating rounds on the same items
and settings, so both see the same machine load; the ratio is the claim, not the absolute times.
Log-likelihoods of the two paths are compared too (max abs difference).

    python tools/bench_eval.py            # 4 items of each of the ten tasks, none + rotated
"""

from __future__ import annotations

import argparse
import statistics
import time


def token_rows(model_tok, tasks: list[str], limit: int) -> tuple[int, int]:
    """Rows one uncompressed pass runs through the layers, old path (each choice's whole
    sequence, padded to the item's longest) vs new (each shared context once, each continuation
    without its last token): the ceiling of the speed-up when a row costs the same in both."""
    from fc_edge.eval.tasks import encode_item, load_task

    tok = model_tok

    def encode(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    old = new = 0
    for task in tasks:
        for item in load_task(task, None, limit):
            enc = encode_item(item, encode, prefix_id=tok.eos_token_id, max_len=2048)
            old += len(enc.sequences) * max(len(s) for s in enc.sequences)
            groups: dict[tuple[int, ...], list[int]] = {}
            for seq, st in zip(enc.sequences, enc.starts, strict=True):
                groups.setdefault(tuple(seq[:st]), []).append(len(seq) - st)
            new += sum(len(c) + sum(k - 1 for k in ks) for c, ks in groups.items())
    return old, new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="arc_challenge,arc_easy,commonsenseqa,cosmosqa,logiqa,"
                    "openbookqa,piqa,qasc,siqa,winogrande")
    ap.add_argument("--limit", type=int, default=4, help="items per task")
    ap.add_argument("--codecs", default="none,rotated")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-items", type=int, default=32)
    ap.add_argument("--batch-tokens", type=int, default=256)
    args = ap.parse_args()

    import torch

    from fc_edge.eval.accuracy import evaluate
    from fc_edge.eval.settings import build_settings
    from fc_edge.eval.tasks import default_data_dir
    from fc_edge.models.pretrained import load_model

    torch.set_num_threads(args.threads)
    if not default_data_dir().is_dir():
        print("skipped: ../shared/datasets is absent")
        return
    model, tok = load_model(args.model)
    tasks = [t for t in args.tasks.split(",") if t]
    times: dict[bool, list[float]] = {False: [], True: []}
    out: dict[bool, dict] = {}
    for _ in range(args.rounds):
        for shared in (False, True):
            t0 = time.perf_counter()
            out[shared] = evaluate(model, tok, tasks, build_settings(args.codecs), [1],
                                   limit=args.limit, progress=False, record_items=True,
                                   shared_context=shared, batch_items=args.batch_items,
                                   batch_tokens=args.batch_tokens)
            times[shared].append(time.perf_counter() - t0)
    diff = 0.0
    for task in tasks:
        for a, b in zip(out[True]["records"][task], out[False]["records"][task], strict=True):
            for key, st in a["s"].items():
                diff = max(diff, *(abs(x - y) for x, y in
                                   zip(st["ll"], b["s"][key]["ll"], strict=True)))
    n = out[True]["timing"]["items"]
    old, new = statistics.median(times[False]), statistics.median(times[True])
    print(f"# eval throughput: {n} items ({args.limit} per task of {','.join(tasks)}), "
          f"settings {args.codecs}, split 1, {args.threads} thread(s), {args.rounds} rounds, "
          f"batches of {args.batch_items} items / {args.batch_tokens} rows")
    print(f"old (per choice):      {old:8.1f} s  {n / old:.3f} items/s")
    print(f"new (batched trees):   {new:8.1f} s  {n / new:.3f} items/s")
    print(f"speed-up old/new: {old / new:.2f}x   max |loglik old - new|: {diff:.2e} nats")
    rows_old, rows_new = token_rows(tok, tasks, args.limit)
    print(f"rows through the layers per uncompressed pass: old {rows_old}, new {rows_new}: "
          f"ceiling {rows_old / rows_new:.2f}x at equal cost per row (codecs whose coded "
          "contexts differ per choice share less)")


if __name__ == "__main__":
    main()
