"""lm-evaluation-harness backend: any lm-eval task with a codec at the split (optional extra).

::

    pip install 'fc-edge[eval]'
    lm_eval --model fc-edge \\
        --model_args pretrained=smollm2-135m,split_layer=1,codec=fourier,ratio=8 --tasks piqa

lm-eval 0.4.13 does not load third-party models from entry points by itself, so the same
command also runs as ``python -m fc_edge.eval.lm_eval_backend run --model fc-edge ...``
(lm-eval's own CLI, after registering ``fc-edge``).

``pretrained`` is any spec :func:`fc_edge.models.pretrained.load_model` takes (the default model,
a Hugging Face folder, a .gguf file). Every other model argument but ``split_layer``, ``codec``
and ``batch_size`` is a codec keyword (``ratio``, ``bits``, ``group_size``, ...). ``codec=none``
is the uncompressed model. The model is registered under the name ``fc-edge`` when this module
is imported (lm-eval's ``lm_eval`` entry point group names it, and ``--include_path`` or an
``import fc_edge.eval.lm_eval_backend`` also work).

Log-likelihoods are computed exactly like ``fc-edge eval`` (same tokenization, same split
forward, the codec on each request's own (S, D) activation through the wire format).
"""

from __future__ import annotations

from typing import Any

import torch

from fc_edge.errors import ConfigError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - only without the extra
    raise ImportError("the lm-eval backend needs lm-eval: pip install 'fc-edge[eval]'") from e

_NOT_CODEC = {"pretrained", "split_layer", "codec", "batch_size", "max_batch_size", "device",
              "max_length", "threads"}


@register_model("fc-edge", "fc_edge")
class FcEdgeLM(LM):
    """A split model with a codec at the split, scored by lm-evaluation-harness."""

    def __init__(self, pretrained: Any = "smollm2-135m", split_layer: int = 1,
                 codec: str = "none", batch_size: int | str | None = 8,
                 max_length: int = 2048, **kwargs: Any) -> None:
        super().__init__()
        from fc_edge.codecs import get_codec
        from fc_edge.eval.forward import LayerStack
        from fc_edge.eval.settings import NONE, CodecSetting
        from fc_edge.models.pretrained import load_model

        if kwargs.get("threads"):
            torch.set_num_threads(int(kwargs["threads"]))
        codec_kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_CODEC}
        if isinstance(pretrained, tuple):  # (model, tokenizer) already loaded (tests, notebooks)
            self.model, self.tokenizer = pretrained
        else:
            self.model, self.tokenizer = load_model(str(pretrained))
        if self.tokenizer is None:
            raise ConfigError(f"model {pretrained!r} has no tokenizer")
        self.stack = LayerStack(self.model)
        self.split_layer = int(split_layer)
        self.stack.check_split(self.split_layer)
        name = str(codec)
        if name == NONE:
            if codec_kwargs:
                raise ConfigError(f"codec 'none' takes no parameters, got {sorted(codec_kwargs)}")
            self.setting = CodecSetting(NONE, NONE)
        else:
            self.setting = CodecSetting(name, name, codec_kwargs, get_codec(name, **codec_kwargs))
        self.setting.bind(self.model, self.split_layer)
        try:
            self.batch = max(1, int(batch_size))
        except (TypeError, ValueError):
            self.batch = 8  # "auto" and friends
        self.max_length = int(max_length)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _score(self, seqs: list[list[int]], starts: list[int]) -> list[tuple[float, bool]]:
        from fc_edge.eval.forward import pad_batch
        from fc_edge.eval.multiple_choice import send_prefills

        eos = self.tokenizer.eos_token_id
        ids, lengths = pad_batch(seqs, eos if eos is not None else 0)
        out = []
        with torch.inference_mode():
            h, ctx = self.stack.start(ids)
            h = self.stack.run(h, ctx, 0, self.split_layer)
            h = send_prefills(self.setting, h, lengths)
            h = self.stack.run(h, ctx, self.split_layer, self.stack.num_layers)
            for r, (n, s) in enumerate(zip(lengths, starts, strict=True)):
                pos = torch.arange(s - 1, n - 1)
                logits = self.stack.logits_at(h, torch.full_like(pos, r), pos).double()
                toks = ids[r, s:n]
                lp = torch.log_softmax(logits, -1)
                ll = float(lp.gather(1, toks.view(-1, 1)).sum())
                out.append((ll, bool((logits.argmax(-1) == toks).all())))
        return out

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        from fc_edge.eval.tasks import Item, encode_item

        encoded = []
        for req in requests:
            context, continuation = req.args
            enc = encode_item(Item("", (context,), (continuation,), 0), self._encode,
                              prefix_id=self.tokenizer.eos_token_id, max_len=self.max_length)
            encoded.append((list(enc.sequences[0]), enc.starts[0]))
        # longest first, so a batch pads little
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(encoded)
        from tqdm import tqdm

        for b in tqdm(range(0, len(order), self.batch), disable=disable_tqdm, desc="fc-edge"):
            idx = order[b: b + self.batch]
            scores = self._score([encoded[i][0] for i in idx], [encoded[i][1] for i in idx])
            for i, sc in zip(idx, scores, strict=True):
                results[i] = sc
        return [r for r in results if r is not None]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        """Whole-document log-likelihood in windows of ``max_length`` tokens (no overlap)."""
        eos = self.tokenizer.eos_token_id
        out = []
        for req in requests:
            (text,) = req.args
            ids = self._encode(text)
            total = 0.0
            for w in range(0, len(ids), self.max_length - 1):
                window = ids[w: w + self.max_length - 1]
                prefix = [eos] if w == 0 else [ids[w - 1]]
                total += self._score([prefix + window], [1])[0][0]
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("the fc-edge lm-eval backend scores log-likelihood tasks "
                                  "only; generation runs through `fc-edge generate`")


def main() -> None:
    """lm-eval's command line with the ``fc-edge`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
