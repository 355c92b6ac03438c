#!/usr/bin/env python
"""Time per generated token: split generation over loopback gRPC vs ``model.generate``.

Both sides run in this one process on the same model, the same prompt and the same number of
new tokens (EOS off), greedy, alternating ``--repeats`` times after a warm-up; the figure is the
ratio of the medians of wall time / generated tokens (prefill included on both sides). The split
side is the whole runtime: head, codec (``identity`` by default), wire, gRPC stream to a server on
127.0.0.1, tail, sampling, and the token back.

    python tools/bench_runtime.py                       # SmolLM2-135M, 64 tokens, identity
    python tools/bench_runtime.py --model synthetic:tiny-llama --codec int8

Target on SmolLM2-135M, CPU: ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def hf_generate(model, ids: torch.Tensor, n: int) -> list[int]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        out = model.generate(ids[None], attention_mask=torch.ones_like(ids)[None],
                             generation_config=config)
    return out[0, ids.numel():].tolist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split-layer", type=int, default=None)
    p.add_argument("--codec", default="identity")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    p.add_argument("--prompt", default="Once upon a time, in a small village by the sea,")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (median)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args(argv)

    from fc_edge.models.pretrained import load_model
    from fc_edge.runtime.client import DeviceClient
    from fc_edge.runtime.server import default_split_layer, start_server
    from fc_edge.runtime.timing import format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    if tokenizer is not None:
        ids = torch.tensor(tokenizer(args.prompt)["input_ids"])
    else:
        ids = torch.arange(1, 17) % model.config.vocab_size
    layer = args.split_layer if args.split_layer is not None else default_split_layer(model)
    n = args.tokens
    hf_times: list[float] = []
    split_times: list[float] = []
    results = []
    with start_server(model, layer, port=0) as handle, \
            DeviceClient(handle.address, (model, tokenizer), layer, args.codec) as client:
        hf_generate(model, ids, 4)  # warm-up both paths
        client.generate(ids, 4, eos_token_id=None)
        for _ in range(args.repeats):
            t = time.perf_counter()
            hf_tokens = hf_generate(model, ids, n)
            hf_times.append((time.perf_counter() - t) / len(hf_tokens))
            t = time.perf_counter()
            result = client.generate(ids, n, eos_token_id=None)
            split_times.append((time.perf_counter() - t) / len(result.token_ids))
            results.append(result)
    hf_s, split_s = statistics.median(hf_times), statistics.median(split_times)
    r = results[len(results) // 2]
    same = sum(a == b for a, b in zip(hf_tokens, r.token_ids, strict=False))
    print(f"model {args.model}, split layer {layer}, codec {args.codec}, prompt {ids.numel()} "
          f"tokens, {n} new tokens, {args.repeats} runs each, torch threads "
          f"{torch.get_num_threads()}")
    print(format_table(
        ["path", "ms/token (median)", "runs ms/token"],
        [["model.generate", f"{hf_s * 1e3:.2f}", " ".join(f"{x * 1e3:.1f}" for x in hf_times)],
         [f"split over loopback ({args.codec})", f"{split_s * 1e3:.2f}",
          " ".join(f"{x * 1e3:.1f}" for x in split_times)]]))
    d = r.decode_steps
    if d:
        unpack = r.median("server_unpack_s") + r.median("server_decode_s")
        print(f"split decode step medians (ms): head {r.median('device_compute_s') * 1e3:.2f}, "
              f"encode+pack {(r.median('encode_s') + r.median('pack_s')) * 1e3:.2f}, "
              f"network {r.median('network_s') * 1e3:.2f}, "
              f"unpack+decode {unpack * 1e3:.2f}, "
              f"tail {r.median('server_compute_s') * 1e3:.2f}; bytes up {r.steps[0].bytes_up} "
              f"prefill, {int(r.median('bytes_up'))} per decode step")
    print(f"tokens equal to model.generate: {same}/{n}")
    print(f"ratio split / model.generate: {split_s / hf_s:.3f}x (target <= 1.15x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
