"""The trained built-in model's parts (builtin_copier.py): the copy data, the trainable Llama against
transformers, the training loop on a toy corpus, and `make-model --size tiny-copy` end to end with the
training cut to two steps (the real few-minute training is measured in benchmarks/speculative.py and
docs/speculative.md, not here)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from pdserve.engine import builtin_copier, builtin_model
from pdserve.engine.builtin_copier import CopyTraining, copy_batch, induction_positions, new_model, train_copier
from pdserve.engine.builtin_model import BuiltinSize

TOY = BuiltinSize(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=64)


def test_copy_batch_repeats_earlier_spans():
    ids = np.arange(100_000, dtype=np.int64)  # every corpus token distinct: a copy is visible
    cfg = CopyTraining(batch_size=16, seq_len=128, copy_fraction=1.0, random_fraction=0.0, min_span=4, max_span=24)
    tokens, source = copy_batch(ids, torch.Generator().manual_seed(0), cfg)
    assert tokens.shape == source.shape == (16, 129)
    for b in range(16):
        start = None
        for t in range(129):
            s = int(source[b, t])
            if s < 0:  # untouched: the corpus window itself
                start = int(tokens[b, t]) - t if start is None else start
                assert int(tokens[b, t]) == start + t
            else:
                assert 0 <= s < t and tokens[b, t] == tokens[b, s]
        assert (source[b] >= 0).any()
    assert 0.2 < (source >= 0).float().mean() < 0.8
    # runs of consecutive sources are the spans, within the bounds
    runs = [r for row in source.tolist() for r in _runs(row)]
    assert runs and all(4 <= r <= 24 for r in runs), runs
    again, _ = copy_batch(ids, torch.Generator().manual_seed(0), cfg)
    assert torch.equal(again, tokens)
    plain, none = copy_batch(ids, torch.Generator().manual_seed(0), replace(cfg, copy_fraction=0.0))
    assert (none < 0).all()
    ind = induction_positions(source)
    assert ind.sum() == (source >= 0).sum() - len(runs)  # every copied token but each span's first
    # random-token windows: not the corpus (ids 3.. its largest), copied the same way
    noise, source = copy_batch(ids, torch.Generator().manual_seed(0), replace(cfg, random_fraction=1.0))
    starts = noise[:, 0:1]
    assert not (noise == starts + torch.arange(129)).all(dim=1).any()
    assert noise.min() >= 3 and noise.max() < len(ids) and (source >= 0).any(dim=1).all()
    assert (noise.gather(1, source.clamp(min=0)) == noise)[source >= 0].all()


def _runs(row: list[int]) -> list[int]:
    runs, n = [], 0
    for i, s in enumerate(row):
        if s >= 0 and n and row[i - 1] == s - 1:
            n += 1
            continue
        if n:
            runs.append(n)
        n = 1 if s >= 0 else 0
    return runs + ([n] if n else [])


def test_trainable_llama_is_the_llama_transformers_loads(tmp_path):
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    model = new_model(TOY, seed=0).eval()
    (tmp_path / "config.json").write_text(json.dumps(builtin_model._model_config(TOY)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, TOY.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.abs().max() > 0.01  # not a degenerate comparison
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_training_lowers_the_loss_and_is_deterministic():
    rng = np.random.default_rng(0)
    ids = np.tile(rng.integers(3, TOY.vocab_size, 97), 300)  # a 97-token text, over and over
    cfg = CopyTraining(steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=5, progress_every=20,
                       min_span=4, max_span=12)
    lines: list[str] = []
    tensors, summary = train_copier(TOY, ids, cfg, progress=lines.append)
    assert summary["steps"] == 40 and summary["version"] == builtin_copier.COPIER_VERSION
    assert summary["last_loss"] < 0.75 * summary["first_loss"], summary
    assert [line.split(",")[0] for line in lines[:2]] == ["training the copier: step 20/40",
                                                          "training the copier: step 40/40"]
    assert set(tensors) == set(new_model(TOY, 0).state_dict())
    short = replace(cfg, steps=5)
    first, _ = train_copier(TOY, ids, short, progress=lambda _: None)
    second, _ = train_copier(TOY, ids, short, progress=lambda _: None)
    assert all(torch.equal(first[k], second[k]) for k in first)
    other, _ = train_copier(TOY, ids, replace(short, seed=1), progress=lambda _: None)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_training_stops_at_the_wall_time_bound():
    ids = np.arange(3, 64, dtype=np.int64).repeat(50)
    lines: list[str] = []
    _, summary = train_copier(TOY, ids, CopyTraining(steps=1000, batch_size=2, seq_len=16, max_seconds=0.0),
                              progress=lines.append)
    assert summary["steps"] == 1 and "stopped at step 1/1000" in lines[0]


def test_the_wired_circuit_copies_before_any_training():
    """The training's start: on random-token windows (no text statistics to lean on) the hand-set
    2-gram induction circuit predicts the copied tokens, and nothing else."""
    size = replace(builtin_model.SIZES["tiny"], rope_theta=builtin_copier.COPIER_ROPE_THETA)
    model = new_model(size, 0)
    model.load_state_dict(builtin_copier.wired_weights(size, seed=0))
    ids = np.arange(3, size.vocab_size, dtype=np.int64).repeat(4)
    cfg = CopyTraining(batch_size=4, seq_len=256, copy_fraction=1.0, random_fraction=1.0)
    accuracy = builtin_copier.copy_accuracy(model.eval(), ids, cfg, seed=0)
    assert accuracy["copied"] > 0.9 and accuracy["other"] < 0.05, accuracy
    with pytest.raises(ValueError, match="head_dim 64"):
        builtin_copier.wired_weights(TOY, seed=0)


@pytest.fixture
def two_step_training(monkeypatch):
    monkeypatch.setattr(builtin_copier, "CopyTraining",
                        lambda: CopyTraining(steps=2, batch_size=2, seq_len=32, progress_every=1))


def test_make_model_tiny_copy(two_step_training, tiny_model_dir, tmp_path, capsys):
    from pdserve import cli
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    out = tmp_path / "copy"
    assert cli.main(["make-model", "--size", "tiny-copy", str(out)]) == 0
    captured = capsys.readouterr()
    assert "training its weights a few minutes" in captured.out and "step 2/2" in captured.err
    config = json.loads((out / "config.json").read_text())
    tiny = json.loads((tiny_model_dir / "config.json").read_text())
    assert {k: v for k, v in config.items() if k not in ("pdserve_builtin_size", "pdserve_copier")} == {
        **tiny, "rope_theta": builtin_copier.COPIER_ROPE_THETA}
    assert config["pdserve_builtin_size"] == "tiny-copy"
    assert config["pdserve_copier"]["steps"] == 2 and "seconds" not in config["pdserve_copier"]
    assert (out / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    assert builtin_model.count_params("tiny-copy") == builtin_model.count_params("tiny")
    # the engine serves it; it has no built-in draft (tiny-draft is another model's weights)
    engine = LLMEngine(EngineConfig(model=str(out), num_kv_blocks=64))
    [done] = engine.generate([[1, 50, 60, 70]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(done.token_ids) == 4
    assert builtin_model.builtin_draft_for(out) is None


def test_a_cached_copier_from_another_training_version_is_rebuilt(two_step_training, tmp_path, monkeypatch):
    path = builtin_model.ensure_builtin_model("tiny-copy", cache_dir=tmp_path)
    assert path == tmp_path / "tiny-copy-seed0" and builtin_model._is_current(path)
    monkeypatch.setattr(builtin_copier, "COPIER_VERSION", builtin_copier.COPIER_VERSION + 1)
    assert not builtin_model._is_current(path)
