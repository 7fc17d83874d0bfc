"""Speculative decoding through the engine on the built-in tiny model, for both proposers (n-gram, and
the built-in tiny-draft): greedy output identical with and without it, rejected proposals leave no
blocks and no KV behind (cached blocks hold exactly the KV a plain engine computes), random aborts
leak nothing (target pool and draft pool), config errors are clear; the cost control, against a modelled
clock, keeps speculating where it pays and falls back to plain decoding where it costs more.

The mechanism tests speculate on every step (FIXED: no cost control, whose choices follow measured
time); the cost control's own tests drive it with a clock that advances by a modelled cost of each
forward pass."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
FIXED = {"speculative_cost_control": False}


def repetitive_prompts(engine: LLMEngine, n: int = 4, seed: int = 0) -> list[list[int]]:
    """Prompts whose continuation repeats earlier text (as a code edit repeats the code it was shown):
    a passage, the model's own continuation of it, the passage again. Plus one random prompt."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    bases = [torch.randint(3, vocab, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n)]
    conts = engine.generate(bases, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    return [b + c.token_ids + b for b, c in zip(bases, conts)] + [torch.randint(3, vocab, (50,), generator=g).tolist()]


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=256))


@pytest.fixture(scope="module")
def prompts(plain):
    return repetitive_prompts(plain)


def _all_free(engine: LLMEngine) -> bool:
    spec = engine.scheduler.speculator
    if spec is not None and spec.proposer.states:  # a proposer's per-sequence state (n-gram index, draft context)
        return False
    draft = getattr(spec.proposer, "bm", None) if spec is not None else None
    if draft is not None and draft.num_free_blocks != draft.num_blocks:
        return False
    return engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


PROPOSERS = ["ngram", "draft"]


@pytest.mark.parametrize("proposer", PROPOSERS)
@pytest.mark.parametrize("config", [{}, {"num_speculative_tokens": 1}, {"num_speculative_tokens": 7,
                                                                           "max_num_batched_tokens": 16}],
                         ids=["k4", "k1", "k7-small-chunks"])
def test_greedy_equals_plain_decode(tiny_model_dir, plain, prompts, proposer, config):
    want = [c.token_ids for c in plain.generate(prompts, GREEDY)]
    spec = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=256, speculative=proposer, **FIXED,
                                  **config))
    got = [c.token_ids for c in spec.generate(prompts, GREEDY)]
    assert got == want
    s = spec.stats()
    # proposals were made, some accepted and some rejected: both paths ran
    assert s["spec_accepted_tokens"] > 0 and s["spec_proposed_tokens"] > s["spec_accepted_tokens"], s
    assert s["num_generation_tokens"] == sum(map(len, got))
    assert _all_free(spec)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_cached_blocks_hold_only_accepted_kv(tiny_model_dir, prompts, proposer):
    """Every block in the prefix-cache index after speculative decoding holds the KV a plain engine
    computes for the same tokens (a rejected proposal's KV in one of them would differ by far)."""
    cfg = dict(model=str(tiny_model_dir), num_kv_blocks=256, block_size=4)  # small blocks: many fill during decode
    spec = LLMEngine(EngineConfig(speculative=proposer, **FIXED, **cfg))
    ref = LLMEngine(EngineConfig(**cfg))
    assert [c.token_ids for c in spec.generate(prompts, GREEDY)] == [c.token_ids for c in ref.generate(prompts, GREEDY)]
    assert spec.stats()["spec_proposed_tokens"] > spec.stats()["spec_accepted_tokens"] > 0
    hashes = spec.block_manager.hash_to_block_id
    assert set(hashes) == set(ref.block_manager.hash_to_block_id)  # the same full blocks, prompt and generated
    assert len(hashes) > sum(len(p) // 4 for p in prompts)  # generated blocks among them
    for layer in range(spec.model_config.num_layers):
        for a, b in zip(spec.kv_cache.layer_blocks(layer), ref.kv_cache.layer_blocks(layer)):
            for h, block in hashes.items():
                torch.testing.assert_close(a[block], b[ref.block_manager.hash_to_block_id[h]], rtol=1e-4, atol=1e-4)
    # and a follow-up turn served from those blocks continues exactly as the plain engine does
    follow = [p + c.token_ids for p, c in zip(prompts, ref.generate(prompts, GREEDY))]
    got = spec.generate(follow, GREEDY)
    assert [c.token_ids for c in got] == [c.token_ids for c in ref.generate(follow, GREEDY)]
    assert all(c.num_cached_tokens > len(p) for c, p in zip(got, prompts))


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_random_aborts_leak_no_blocks(tiny_model_dir, prompts, proposer):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64, speculative=proposer, **FIXED))
    rng = random.Random(7)
    live: list[str] = []
    for i in range(60):
        if rng.random() < 0.5 and len(live) < 6:
            rid = f"r{i}"
            params = SamplingParams(max_tokens=rng.randint(1, 30), temperature=rng.choice([0.0, 0.8]),
                                    ignore_eos=True)
            engine.add_request(rid, rng.choice(prompts), params)
            live.append(rid)
        if live and rng.random() < 0.3:
            engine.abort_request(live.pop(rng.randrange(len(live))))
        for _ in range(rng.randint(0, 3)):
            engine.step()
        live = [r for r in live if r in engine.requests]
    assert engine.stats()["spec_drafts"] > 0
    for rid in live:
        engine.abort_request(rid)
    assert not engine.has_unfinished() and not engine.requests
    assert _all_free(engine)


@pytest.mark.parametrize("proposer", PROPOSERS)
def test_sampled_output_reproduces_with_a_seed(tiny_model_dir, prompts, proposer):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=256, speculative=proposer, **FIXED))
    p = SamplingParams(max_tokens=30, temperature=0.8, seed=42, ignore_eos=True)
    a = engine.generate(prompts[:2], p)
    b = engine.generate(prompts[:2], p)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert all(len(c.token_ids) == 30 for c in a)


def test_logprobs_and_stop_tokens_inside_accepted_runs(tiny_model_dir, plain, prompts):
    want = plain.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=True))
    spec = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=256, speculative="ngram", **FIXED))
    got = spec.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=True))
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=1e-4, atol=1e-4)
    # a stop token in the middle of an accepted run ends the request right there
    stop_at = want[0].token_ids[25]
    out = spec.generate(prompts[:1], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                    stop_token_ids=[stop_at]))[0]
    assert out.token_ids == want[0].token_ids[:want[0].token_ids.index(stop_at) + 1]
    assert out.finish_reason == "stop"
    assert _all_free(spec)


class ModelledClock:
    """The speculator's clock, advanced only by a modelled cost of each forward pass (target and draft)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def charge(self, runner, seconds_for_rows) -> None:
        execute = runner.execute

        def costed(batch, *args, **kwargs):
            self.now += seconds_for_rows(sum(item.num_new_tokens for item in batch))
            return execute(batch, *args, **kwargs)

        runner.execute = costed


def _costed_engine(tiny_model_dir, target_s, draft_s) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=256, speculative="draft",
                                    max_num_batched_tokens=2048))  # each batch's prompts in one step
    clock = ModelledClock()
    engine.scheduler.speculator.clock = clock
    clock.charge(engine.runner, target_s)
    clock.charge(engine.scheduler.speculator.proposer.runner, draft_s)
    return engine


def test_cost_control_falls_back_where_speculating_costs_more(tiny_model_dir, plain, prompts):
    """Compute-bound steps (every row costs the same, the draft half as much): 8 sequences speculating
    make fewer tokens per second than decoding plainly, however much is accepted, so after measuring
    each choice the engine stops proposing for that batch size; the output is unchanged."""
    batch = (prompts * 2)[:8]
    params = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
    engine = _costed_engine(tiny_model_dir, lambda rows: 0.001 * rows, lambda rows: 0.0005 * rows)
    assert [c.token_ids for c in engine.generate(batch, params)] == [c.token_ids for c in plain.generate(batch, params)]
    spec = engine.scheduler.speculator
    b = spec.cost.buckets[8]
    assert b.best == 0
    measured = {k: c.num_samples for k, c in b.choices.items()}
    assert measured[0] > 3 * sum(n for k, n in measured.items() if k), measured  # plain after a few probes
    # the next batch of 8 is not worth the draft's prefill of its prompts: only a probe may start one
    # sequence's draft (so that it can measure at all), and almost nothing is proposed
    catchup, proposed = spec.proposer.num_catchup_tokens, spec.num_proposed_tokens
    assert [c.token_ids for c in engine.generate(batch, params)] == [c.token_ids for c in plain.generate(batch, params)]
    assert spec.proposer.num_catchup_tokens - catchup <= 3 * (max(len(p) for p in batch) + params.max_tokens)
    assert spec.num_proposed_tokens - proposed < 0.05 * len(batch) * params.max_tokens
    assert _all_free(engine)


def test_probes_spend_little_on_starting_drafts_where_plain_is_best(tiny_model_dir, plain, prompts):
    """A draft as slow as the target never pays, so plain decoding is best; each probe of speculation
    could start a new sequence's draft (a prefill of its prompt, here ~7 decode steps' worth), which is
    what made tiny 0.84-0.90x with the draft. Those catch-ups stay within PROBE_CATCHUP_SHARE of the step
    time (plus the one that crossed it): over 12 requests one at a time, one or two, not one a probe."""
    from pdserve.engine.spec.speculator import PROBE_CATCHUP_SHARE

    engine = _costed_engine(tiny_model_dir, lambda rows: 0.001 * rows, lambda rows: 0.001 * rows)
    spec = engine.scheduler.speculator
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    for p in prompts[:3]:  # the cost control measures every k (drafts start to learn), then settles on plain
        engine.generate([p], params)
    assert spec.cost.buckets[1].best == 0
    catchup, seconds = spec.proposer.num_catchup_tokens, spec.probe_catchup_seconds
    for p in (prompts * 3)[:12]:
        assert engine.generate([p], params)[0].token_ids == plain.generate([p], params)[0].token_ids
    spent = spec.probe_catchup_seconds - seconds
    one_catchup_s = 0.001 * (max(map(len, prompts)) + params.max_tokens)  # the longest context there was
    assert 0 < spent <= PROBE_CATCHUP_SHARE * spec.step_seconds + one_catchup_s + 0.01, spent
    # unbounded, each of the ~12 probes (every <= 64 steps of 12 x 48) would have started one
    assert spec.proposer.num_catchup_tokens - catchup <= 2 * (max(map(len, prompts)) + params.max_tokens)
    assert _all_free(engine)


def test_cost_control_keeps_speculating_where_it_pays(tiny_model_dir, plain, prompts):
    """Memory-bound steps (the weights' read dominates, rows nearly free, a draft step 0.1 of the
    target's): at batch 1 speculating with the bfloat16 draft makes more tokens per second, so the
    engine keeps doing it; the output is unchanged."""
    params = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
    engine = _costed_engine(tiny_model_dir, lambda rows: 0.010 + 0.0001 * rows, lambda rows: 0.001 + 0.0001 * rows)
    got = engine.generate(prompts[:1], params)[0].token_ids
    assert got == plain.generate(prompts[:1], params)[0].token_ids
    spec = engine.scheduler.speculator
    assert spec.cost.buckets[1].best > 0
    assert spec.num_steps_by_k.get(0, 0) < 0.2 * sum(spec.num_steps_by_k.values()), spec.num_steps_by_k
    assert spec.stats()["spec_accepted_tokens"] > len(got) // 2
    # a new sequence's draft prefill is paid only where its remaining tokens win it back
    long_prompt = torch.randint(3, engine.model_config.vocab_size, (500,), generator=torch.Generator().manual_seed(1))
    for max_tokens, catches_up in [(3, False), (96, True)]:
        before = spec.proposer.num_catchup_tokens
        engine.generate([long_prompt.tolist()], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        assert (spec.proposer.num_catchup_tokens > before) == catches_up, (max_tokens, spec.seconds_per_catchup_token)


@pytest.mark.parametrize("kwargs, needle", [
    ({"speculative": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be in [1, 16]"),
    ({"speculative": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens must be in [1, 16]"),
    ({"speculative": "eagle"}, "speculative must be off, ngram or draft"),
    ({"speculative": "ngram", "speculative_ngram_min": 3, "speculative_ngram_max": 2}, "ngram-min"),
    ({"draft_model": "/x"}, "only with --speculative draft"),
])
def test_bad_config_is_a_clear_error(kwargs, needle):
    with pytest.raises(ValueError, match=None) as err:
        EngineConfig(**kwargs)
    assert needle in str(err.value)


def test_a_draft_with_another_vocabulary_or_tokenizer_is_refused(tiny_model_dir, hf_model_dirs, tmp_path):
    with pytest.raises(ValueError) as err:
        LLMEngine(EngineConfig(model=str(tiny_model_dir), speculative="draft", draft_model=str(hf_model_dirs["llama"])))
    assert str(hf_model_dirs["llama"]) in str(err.value) and str(tiny_model_dir) in str(err.value)
    assert "512" in str(err.value) and "2048" in str(err.value)
    # same vocabulary size, different tokenizer: two token ids swapped
    from pdserve.engine.builtin_model import builtin_draft_for

    bad = tmp_path / "bad-draft"
    shutil.copytree(builtin_draft_for(tiny_model_dir), bad)
    tok = json.loads((bad / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="different tokenizer") as err:
        LLMEngine(EngineConfig(model=str(tiny_model_dir), speculative="draft", draft_model=str(bad)))
    assert str(bad) in str(err.value) and str(tiny_model_dir) in str(err.value)


def test_draft_needs_a_draft_model_for_other_models(hf_model_dirs):
    with pytest.raises(ValueError, match="give --draft-model"):
        LLMEngine(EngineConfig(model=str(hf_model_dirs["llama"]), speculative="draft"))


@pytest.fixture(scope="module")
def copier_dir(tiny_model_dir, tmp_path_factory):
    """tiny-copy's starting point (the wired induction circuit, no training: the trained model takes
    minutes to make): a model that continues a repeated passage by copying it, tiny's tokenizer."""
    from safetensors.torch import save_file

    from pdserve.engine import builtin_copier, builtin_model

    out = tmp_path_factory.mktemp("copier")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, out / name)
    size = builtin_model.SIZES["tiny"]
    size = type(size)(**{**{f: getattr(size, f) for f in size.__dataclass_fields__},
                         "rope_theta": builtin_copier.COPIER_ROPE_THETA})
    (out / "config.json").write_text(json.dumps(builtin_model._model_config(size)))
    save_file(builtin_copier.wired_weights(size, seed=0), str(out / "model.safetensors"))
    return out


def test_greedy_equals_plain_decode_on_a_model_that_copies(copier_dir):
    """With a model that copies, n-gram proposals are accepted in long runs (whole k-token runs, the path
    a random model rarely takes); the output still equals plain decoding token for token."""
    g = torch.Generator().manual_seed(3)
    passages = [torch.randint(3, 2048, (int(n),), generator=g).tolist() for n in (40, 64, 90)]
    prompts = [p + p[:8] for p in passages] + [torch.randint(3, 2048, (50,), generator=g).tolist()]
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    plain = LLMEngine(EngineConfig(model=str(copier_dir), num_kv_blocks=256))
    want = [c.token_ids for c in plain.generate(prompts, params)]
    assert want[0][:32] == passages[0][8:40]  # it copies
    spec = LLMEngine(EngineConfig(model=str(copier_dir), num_kv_blocks=256, speculative="ngram", **FIXED))
    assert [c.token_ids for c in spec.generate(prompts, params)] == want
    s = spec.stats()
    assert s["spec_accepted_tokens"] > 0.8 * s["spec_proposed_tokens"] > 0, s
    assert s["num_generation_tokens"] / s["spec_drafts"] > 3  # most steps emitted several tokens
    assert _all_free(spec)


def test_a_step_in_which_no_sequence_could_ask_is_a_sample_of_plain_decoding():
    """The cost control learns k's rate only from steps where the proposer was asked (a lookup that found
    nothing counts: it is what k costs); a step planned with k in which every sequence was paused or had
    a draft too far behind decoded plainly, and is a sample of k = 0."""
    from pdserve.engine.sequence import Sequence
    from pdserve.engine.spec.ngram import NgramProposer
    from pdserve.engine.spec.speculator import Speculator

    clock = ModelledClock()
    spec = Speculator(EngineConfig(speculative="ngram"), NgramProposer(2, 4), clock=clock)
    seq = Sequence("a", [5, 6, 7, 8], SamplingParams(max_tokens=100))
    samples = lambda: {k: c.num_samples for k, c in spec.cost.buckets[1].choices.items()}  # noqa: E731
    k = spec.plan(1, 1)
    assert k == 4  # the largest unmeasured choice first
    seq.spec = None
    n = spec.num_tokens_for(seq, k)
    assert spec.propose([seq], [n])[0].token_ids == []  # asked; the lookup found nothing
    clock.now += 0.002
    spec.end_step(0, 1)
    assert samples()[4] == 1 and samples()[0] == 0
    k = spec.plan(1, 1)
    assert k == 2  # the next unmeasured one
    seq.spec.pause_steps = 1  # paused: the scheduler asks no proposer
    assert spec.num_tokens_for(seq, k) == 0
    clock.now += 0.002
    spec.end_step(0, 1)
    assert samples() == {0: 1, 1: 0, 2: 0, 4: 1}


def test_a_proposer_round_is_timed_for_the_cost_control_outside_catch_ups():
    """Speculator.propose times the proposer: a call that proposed k tokens without catching up is k rounds
    (a draft forward over the batch each), the cost control's bound on what speculating can gain; a call
    that also caught up (a draft prefill) is not a round's time."""
    from pdserve.engine.sequence import Sequence
    from pdserve.engine.spec.proposer import Proposal
    from pdserve.engine.spec.speculator import Speculator

    clock = ModelledClock()

    class TimedProposer:
        name = "timed"
        num_catchup_tokens = 0
        states: dict = {}
        catch_up = 0

        def propose(self, seqs, num_tokens):
            self.num_catchup_tokens += self.catch_up
            clock.now += 0.004 * max(num_tokens) + 0.001 * self.catch_up
            return [Proposal([7] * k) for k in num_tokens]

        def lag(self, seq):
            return 0

        def release(self, seq):
            pass

    proposer = TimedProposer()
    spec = Speculator(EngineConfig(speculative="ngram"), proposer, clock=clock)
    seqs = [Sequence("a", [5, 6, 7, 8], SamplingParams(max_tokens=100)), Sequence("b", [5, 6], GREEDY)]
    k = spec.plan(2, 2)
    spec.propose(seqs, [k, k])
    assert spec.cost.buckets[2].proposer_round_s == pytest.approx(0.004)
    proposer.catch_up = 200
    spec.propose(seqs, [k, k])
    assert spec.cost.buckets[2].proposer_round_s == pytest.approx(0.004)  # the catch-up call is not a round
    assert spec.seconds_per_catchup_token == pytest.approx((0.004 * k + 0.2) / 200)
