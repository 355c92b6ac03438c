"""The batching engine without a transport: KV blocks taken as positions grow, preemption that
recomputes (tokens equal Hugging Face's ``generate``), equal prefill slices, failure isolation,
the loop's death, and the static-shape (CUDA-graph) decode step equal to the eager one."""

from __future__ import annotations

import threading

import pytest
import torch
from together import hf_generate as reference  # tests/runtime is on sys.path
from together import run_together as together

from fc_edge.errors import ConfigError, NonFiniteError
from fc_edge.models.head import Head
from fc_edge.models.tail import DecodeGraphs, Segment, Tail
from fc_edge.runtime.engine import BatchEngine, EngineDead, TailError
from fc_edge.runtime.sampling import SamplingConfig

LAYER = 2


def generate(engine: BatchEngine, head: Head, ids: torch.Tensor, n: int,
             sampling: SamplingConfig | None = None, name: str = "s") -> list[int]:
    """A device's loop against the engine: the head's activations in, tokens out."""
    hs = head.start(len(ids) + n)
    session = engine.open(name, len(ids) + n, sampling or SamplingConfig())
    try:
        step = ids
        tokens = []
        for _ in range(n):
            x = engine.prepare(hs.step(step).detach())
            tokens.append(engine.submit(session, x).result(timeout=120).token)
            step = torch.tensor([tokens[-1]])
        return tokens
    finally:
        engine.close(session)


def prompts(n: int, low: int, high: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 200, (int(torch.randint(low, high, (1,), generator=g)),),
                          generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def parts(tiny_llama):
    return Head.from_hf(tiny_llama, LAYER), Tail.from_hf(tiny_llama, LAYER)


def test_blocks_are_taken_as_positions_grow(parts):
    head, tail = parts
    engine = BatchEngine(tail, max_seq_len=64, kv_blocks=8, block_size=16)
    try:
        session = engine.open("a", 64, SamplingConfig())
        assert engine.stats().free_blocks == 8  # an open session holds nothing
        engine.submit(session, engine.prepare(torch.randn(20, 64))).result(30)
        assert len(session.blocks) == 2 and engine.stats().free_blocks == 6
        for _ in range(12):  # positions 20..31: still two blocks
            engine.submit(session, engine.prepare(torch.randn(1, 64))).result(30)
        assert len(session.blocks) == 2
        engine.submit(session, engine.prepare(torch.randn(1, 64))).result(30)  # position 32
        assert len(session.blocks) == 3
        engine.close(session)
        assert engine.stats().free_blocks == 8
    finally:
        engine.stop()


@pytest.mark.parametrize("chunk", [8, 64])
def test_preempted_sessions_recompute_and_equal_generate(tiny_llama, parts, chunk):
    """Six sessions of up to 48 positions share a pool of six 16-position blocks (room for two
    at once): sessions are preempted and recomputed, and every one gets Hugging Face's tokens."""
    head, tail = parts
    jobs = prompts(6, 10, 30, seed=3)
    n = 16
    engine = BatchEngine(tail, max_seq_len=64, kv_blocks=6, block_size=16, prefill_chunk=chunk)
    try:
        got = together(6, lambda i: generate(engine, head, jobs[i], n, name=str(i)))
        stats = engine.stats()
    finally:
        engine.stop()
    assert stats.preemptions > 0
    assert stats.free_blocks == 6 and stats.sessions == 0
    assert got == [reference(tiny_llama, p, n) for p in jobs]


def test_preempted_sampled_sessions_keep_their_draws(parts):
    """A seeded sampled session draws the same tokens with and without preemptions."""
    head, tail = parts
    jobs = prompts(4, 20, 30, seed=5)
    cfg = [SamplingConfig(temperature=1.0, top_k=50, seed=i) for i in range(4)]
    roomy = BatchEngine(tail, max_seq_len=64, kv_blocks=64)
    tight = BatchEngine(tail, max_seq_len=64, kv_blocks=4)
    try:
        alone = [generate(roomy, head, jobs[i], 12, cfg[i]) for i in range(4)]
        squeezed = together(4, lambda i: generate(tight, head, jobs[i], 12, cfg[i], str(i)))
        assert tight.stats().preemptions > 0
    finally:
        roomy.stop()
        tight.stop()
    assert squeezed == alone


def test_prefill_budget_is_shared_in_equal_slices(tiny_llama, parts):
    """A newcomer's 20-row prompt arriving while a 600-row prefill runs (chunks of 64) gets its
    token within two iterations of its arrival, in an iteration about its own size, not after
    the long prompt; both are exact."""
    head, tail = parts
    g = torch.Generator().manual_seed(9)
    long_ids, short_ids = torch.randint(1, 200, (600,), generator=g), torch.randint(
        1, 200, (20,), generator=g)
    log: list[tuple[int, int]] = []
    engine = BatchEngine(tail, max_seq_len=640, kv_blocks=80, prefill_chunk=64,
                         on_iteration=lambda d, p, s: log.append((d, p)))
    try:
        long_s = engine.open("long", 601, SamplingConfig())
        short_s = engine.open("short", 21, SamplingConfig())
        x_long = engine.prepare(head.start(601).step(long_ids).detach())
        x_short = engine.prepare(head.start(21).step(short_ids).detach())
        gate = threading.Event()
        first = engine.on_iteration

        def on_iteration(d: int, p: int, s: float) -> None:
            first(d, p, s)
            gate.set()

        engine.on_iteration = on_iteration
        f_long = engine.submit(long_s, x_long)
        gate.wait(60)  # the long prefill has run one iteration
        arrived = len(log)
        f_short = engine.submit(short_s, x_short)
        short_token = f_short.result(60).token
        served = len(log)
        long_token = f_long.result(120).token
        serving_prefill = log[served - 1][1]
    finally:
        engine.stop()
    assert served - arrived <= 2, (arrived, served, log)
    # the iteration that served the newcomer carried its 20 rows and the long prompt's floor
    # (a sixteenth of the chunk), not the rest of the 64-row budget
    assert serving_prefill <= 20 + 64 // 16, log
    assert max(p for _, p in log) <= 64  # never more than a chunk per iteration
    assert [short_token] == reference(tiny_llama, short_ids, 1)
    assert [long_token] == reference(tiny_llama, long_ids, 1)


def test_a_failing_forward_ends_only_its_session(tiny_llama, parts):
    """A forward that raises whenever one session's rows are in it: that session gets TailError,
    the others (retried one by one) get Hugging Face's tokens, and the loop lives on."""
    head, tail = parts
    poison = 1234.5
    real = tail.forward_packed

    def forward(x, step, cache):
        if bool((x[:, 0] == poison).any()):
            raise RuntimeError("injected failure")
        return real(x, step, cache)

    jobs = prompts(4, 5, 15, seed=11)
    engine = BatchEngine(tail, max_seq_len=64, kv_blocks=32)
    engine.tail = _Proxy(tail, forward_packed=forward)
    errors: list[BaseException] = []

    def hostile() -> None:
        session = engine.open("bad", 64, SamplingConfig())
        x = torch.randn(3, 64)
        x[:, 0] = poison
        for _ in range(5):
            try:
                engine.submit(session, engine.prepare(x)).result(60)
            except TailError as e:
                errors.append(e)
            x = x[:1]
        engine.close(session)

    got = beside(engine, head, jobs, hostile)
    assert len(errors) == 5
    assert got == [reference(tiny_llama, p, 10) for p in jobs]


def beside(engine: BatchEngine, head: Head, jobs: list[torch.Tensor], hostile) -> list:
    """Greedy generations of ``jobs`` (10 tokens) while ``hostile()`` runs on a thread of its
    own; the engine must be alive after; it is stopped."""
    try:
        t = threading.Thread(target=hostile)
        t.start()
        got = together(len(jobs), lambda i: generate(engine, head, jobs[i], 10, name=str(i)))
        t.join(60)
        assert engine.alive()
    finally:
        engine.stop()
    return got


class _Proxy:
    """``tail`` with some attributes replaced."""

    def __init__(self, tail, **replace) -> None:
        self._tail, self._replace = tail, replace

    def __getattr__(self, name):
        return self._replace.get(name, getattr(self._tail, name))


def test_a_queued_session_without_a_step_does_not_kill_the_loop(parts):
    """The race of issue 19 (a session left in the queue with step None): planning drops it and
    goes on."""
    head, tail = parts
    engine = BatchEngine(tail, max_seq_len=32, kv_blocks=8)
    try:
        ghost = engine.open("ghost", 32, SamplingConfig())
        with engine._cv:
            engine._waiting[ghost] = None  # queued, but no step
            engine._cv.notify()
        s = engine.open("ok", 32, SamplingConfig())
        assert engine.submit(s, engine.prepare(torch.randn(4, 64))).result(30).token >= 0
        assert engine.alive() and engine.stats().queued_steps == 0
    finally:
        engine.stop()


def test_loop_death_fails_every_waiting_step_at_once(parts):
    head, tail = parts
    engine = BatchEngine(tail, max_seq_len=32, kv_blocks=8)
    died = threading.Event()
    engine.on_death(lambda e: died.set())
    a, b = engine.open("a", 32, SamplingConfig()), engine.open("b", 32, SamplingConfig())

    def boom():
        raise RuntimeError("planning bug")

    with engine._cv:  # both steps queue before the loop looks
        engine._plan = boom
        fa = engine.submit(a, engine.prepare(torch.randn(2, 64)))
        fb = engine.submit(b, engine.prepare(torch.randn(1, 64)))
    assert died.wait(30)
    for f in (fa, fb):
        with pytest.raises(EngineDead):
            f.result(5)
    assert not engine.alive()
    with pytest.raises(EngineDead):
        engine.open("c", 32, SamplingConfig())


def test_activation_is_checked_at_the_tails_dtype(tiny_llama):
    """3.4e38 is a finite float32 but infinite in bfloat16: refused before it reaches the tail."""
    tail = Tail.from_hf(tiny_llama, LAYER, dtype=torch.bfloat16)
    engine = BatchEngine(tail, max_seq_len=32, kv_blocks=8)
    try:
        x = torch.randn(2, 64)
        x[1, 3] = 3.4e38
        with pytest.raises(NonFiniteError, match="bfloat16"):
            engine.prepare(x)
        assert engine.prepare(torch.randn(2, 64)).dtype == torch.bfloat16
        with pytest.raises(ConfigError):
            engine.prepare(torch.randn(2, 32))
    finally:
        engine.stop()


def test_non_finite_logits_end_only_their_session(tiny_llama, parts):
    """The tail's output of one session turned NaN (as an overflow would): that session's step
    fails with NonFiniteError, its batch-mates get Hugging Face's tokens."""
    head, tail = parts
    poison = 777.0
    real = tail.forward_packed

    def forward(x, step, cache):
        logits = real(x, step, cache)
        bad = x[step.out_rows, 0] == poison
        return logits.masked_fill(bad[:, None], float("nan"))

    jobs = prompts(3, 4, 12, seed=13)
    engine = BatchEngine(tail, max_seq_len=64, kv_blocks=32)
    engine.tail = _Proxy(tail, forward_packed=forward)
    failures: list[BaseException] = []

    def hostile() -> None:
        for i in range(6):
            session = engine.open(f"nan{i}", 8, SamplingConfig(temperature=0.7, seed=i))
            x = torch.randn(1, 64)
            x[0, 0] = poison
            try:
                engine.submit(session, engine.prepare(x)).result(60)
            except NonFiniteError as e:
                failures.append(e)
            engine.close(session)

    got = beside(engine, head, jobs, hostile)
    assert len(failures) == 6
    assert got == [reference(tiny_llama, p, 10) for p in jobs]


@pytest.mark.parametrize("name", ["tiny_llama", "sliding_qwen2"])
def test_static_decode_step_equals_the_eager_step(request, name):
    """The CUDA-graph path's padded static-shape step (rows padded to a batch size, tables to a
    power of two blocks, padding rows writing to the scratch block), run eagerly here: its
    logits equal the unpadded step's, and it leaves the sequences' caches as the eager step
    does."""
    model = request.getfixturevalue(name)
    tail = Tail.from_hf(model, 1)
    g = torch.Generator().manual_seed(4)
    for layer in tail.layers:  # non-zero biases: a padding row's keys are not zeros
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            if proj.bias is not None:  # a new tensor: the model's own stays as it is
                proj.bias = torch.nn.Parameter(torch.randn(proj.bias.shape, generator=g))
    lengths = [3, 17, 9, 30, 1]
    acts = [torch.randn(n + 1, 64, generator=g) for n in lengths]
    eager_cache, static_cache = tail.new_cache(64, 8), tail.new_cache(64, 8)
    graphs = DecodeGraphs(tail, static_cache, max_blocks=8, batch_sizes=(1, 2, 8))
    assert not graphs.capture  # on a CPU the static step runs eagerly
    results = []
    with torch.inference_mode():
        for cache in (eager_cache, static_cache):
            blocks = [cache.allocate(cache.blocks_for(len(a))) for a in acts]
            for a, b in zip(acts, blocks):
                tail.forward_packed(a[:-1], cache.plan([Segment(0, len(a) - 1, b)]), cache)
            segments = [Segment(len(a) - 1, 1, b) for a, b in zip(acts, blocks)]
            x = torch.stack([a[-1] for a in acts])
            if cache is eager_cache:
                results.append(tail.forward_packed(x, cache.plan(segments), cache))
            else:
                assert graphs.shape(len(segments), 4) == (8, 4)
                results.append(graphs.run(x, segments))
            used = [b for bs in blocks for b in bs]
            results.append(torch.cat([cache.k[:, :, used], cache.v[:, :, used]]))
    eager, eager_kv, static, static_kv = results
    assert static.shape == eager.shape == (5, tail.vocab_size)
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(static_kv, eager_kv, rtol=1e-5, atol=1e-6)
    # the padding rows wrote into the scratch block only: the zero block is still zero
    assert static_cache.k[:, :, 0].abs().max() == 0 and static_cache.v[:, :, 0].abs().max() == 0


def test_engine_static_decode_gives_the_same_tokens(tiny_llama, parts):
    head, tail = parts
    jobs = prompts(5, 3, 20, seed=2)
    engine = BatchEngine(tail, max_seq_len=64, kv_blocks=40, cuda_graphs=True)
    try:
        got = together(5, lambda i: generate(engine, head, jobs[i], 12, name=str(i)))
    finally:
        engine.stop()
    assert got == [reference(tiny_llama, p, 12) for p in jobs]


@pytest.mark.cuda
def test_cuda_graph_decode_equals_eager_on_a_gpu(tiny_llama):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the graph capture runs only there")
    tail = Tail.from_hf(tiny_llama, 1, device="cuda")
    cache = tail.new_cache(64, 16)
    graphs = DecodeGraphs(tail, cache, max_blocks=4)
    assert graphs.capture
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(n, 64, generator=g).cuda() for n in (5, 12, 30)]
    blocks = [cache.allocate(2) for _ in acts]
    with torch.inference_mode():
        for a, b in zip(acts, blocks):
            tail.forward_packed(a[:-1], cache.plan([Segment(0, len(a) - 1, b)]), cache)
        segments = [Segment(len(a) - 1, 1, b) for a, b in zip(acts, blocks)]
        x = torch.stack([a[-1] for a in acts])
        eager = tail.forward_packed(x, cache.plan(segments), cache)
        first = graphs.run(x, segments).clone()  # captures
        again = graphs.run(x, segments).clone()  # replays
    torch.testing.assert_close(first, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, first)


def family_model(family: str):
    """A tiny random Gemma 2 (soft caps, a query scale that is not head_dim's, alternating
    windows) or Phi-3 (fused projections, half-rotary heads, a window in every layer)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Phi3Config

    common = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "eos_token_id": None, "bos_token_id": None,
              "pad_token_id": None}
    config = {
        "gemma2": Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                               attn_logit_softcapping=0.5, final_logit_softcapping=0.2),
        "phi3": Phi3Config(**common, tie_word_embeddings=False, sliding_window=6,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.5}),
    }[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)  # attention that is not uniform
    return model


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_batched_sessions_of_other_families_equal_generate(family):
    """The packed forward's grouped attention with the family's scale, soft cap and windows:
    five concurrent sessions (a pool that forces preemption) get Hugging Face's tokens."""
    model = family_model(family)
    head, tail = Head.from_hf(model, LAYER), Tail.from_hf(model, LAYER)
    assert tail.fast_attention()
    jobs = prompts(5, 3, 20, seed=8)
    engine = BatchEngine(tail, max_seq_len=48, kv_blocks=5, prefill_chunk=16)
    try:
        got = together(5, lambda i: generate(engine, head, jobs[i], 12, name=str(i)))
        assert engine.stats().preemptions > 0
    finally:
        engine.stop()
    assert got == [reference(model, p, 12) for p in jobs]
