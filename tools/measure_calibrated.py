"""Bytes on the wire of a calibrated codec through the gRPC runtime (loopback), against identity.

    OMP_NUM_THREADS=1 python tools/measure_calibrated.py \
        --calibration ~/.cache/fc-edge/calibration/klt-99db9df72ccf7740.safetensors

Serves SmolLM2-135M split after layer 1 with the artifact loaded, generates ``--tokens`` greedy
tokens of ``--prompt`` once per codec (klt at ``--bits``, then identity) and prints, per codec,
the prefill's payload bytes and the mean payload bytes of a decode row (with its range), and
whether the two runs' tokens agree.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fc_edge.codecs import get_codec
from fc_edge.models.pretrained import load_model
from fc_edge.runtime.client import DeviceClient
from fc_edge.runtime.server import start_server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split-layer", type=int, default=1)
    p.add_argument("--bits", type=float, default=3.2)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", default="The capital of France is")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    runs = {}
    with start_server((model, tokenizer), args.split_layer, port=0,
                      calibrations=[args.calibration]) as handle:
        for label, codec, cal in ((f"klt[bits={args.bits:g}]", get_codec("klt", bits=args.bits),
                                   args.calibration), ("identity", get_codec("identity"), None)):
            with DeviceClient(handle.address, (model, tokenizer), args.split_layer, codec,
                              calibration=cal) as client:
                r = client.generate(args.prompt, args.tokens, eos_token_id=None)
            pre = [s for s in r.steps if s.phase == "prefill"]
            dec = [s.bytes_up for s in r.steps if s.phase == "decode"]
            runs[label] = r.token_ids
            print(f"{label}: prefill {pre[0].bytes_up} B ({pre[0].rows} rows); decode rows "
                  f"n={len(dec)} mean {statistics.mean(dec):.1f} B (min {min(dec)}, max "
                  f"{max(dec)}); codecs {sorted({s.codec for s in r.steps})}")
    a, b = runs.values()
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    print(f"tokens agree for the first {same} of {len(a)}")


if __name__ == "__main__":
    main()
