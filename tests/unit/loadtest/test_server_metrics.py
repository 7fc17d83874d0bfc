"""Speculative-decoding counters read from a server's /metrics exposition (pdserve's or vLLM's names)."""

from __future__ import annotations

from pdserve.loadtest.config import BenchConfig
from pdserve.loadtest.metrics import SLO, summarize
from pdserve.loadtest.report import format_summary
from pdserve.loadtest.runner import BenchResult
from pdserve.loadtest.server_metrics import parse_spec_counters, spec_decode_delta

PDSERVE = """# HELP pdserve:spec_decode_num_drafts_total x
# TYPE pdserve:spec_decode_num_drafts_total counter
pdserve:spec_decode_num_drafts_total{worker="d0",role="decode"} 10.0
pdserve:spec_decode_num_drafts_total{worker="d1",role="decode"} 5.0
# TYPE pdserve:spec_decode_num_draft_tokens_total counter
pdserve:spec_decode_num_draft_tokens_total{worker="d0",role="decode"} 40.0
pdserve:spec_decode_num_draft_tokens_total{worker="d1",role="decode"} 20.0
# TYPE pdserve:spec_decode_num_accepted_tokens_total counter
pdserve:spec_decode_num_accepted_tokens_total{worker="d0",role="decode"} 30.0
pdserve:spec_decode_num_accepted_tokens_total{worker="d1",role="decode"} 3.0
"""

VLLM = """# TYPE vllm:spec_decode_num_drafts counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 7.0
# TYPE vllm:spec_decode_num_draft_tokens counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 21.0
# TYPE vllm:spec_decode_num_accepted_tokens counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 14.0
"""


def test_sums_workers_and_takes_differences():
    after = parse_spec_counters(PDSERVE)
    assert after == {"drafts": 15.0, "draft_tokens": 60.0, "accepted_tokens": 33.0}
    before = {"drafts": 5.0, "draft_tokens": 20.0, "accepted_tokens": 13.0}
    spec = spec_decode_delta(before, after)
    assert (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens) == (10, 40, 20)
    assert spec.acceptance_rate == 0.5 and spec.mean_acceptance_length == 3.0


def test_vllm_names_and_absent_counters():
    assert parse_spec_counters(VLLM) == {"drafts": 7.0, "draft_tokens": 21.0, "accepted_tokens": 14.0}
    assert parse_spec_counters("# TYPE other_total counter\nother_total 3\n") is None
    assert spec_decode_delta(None, parse_spec_counters(VLLM)) is None
    same = parse_spec_counters(VLLM)
    assert spec_decode_delta(same, same) is None  # nothing proposed during the run: no section


def test_report_prints_the_acceptance_rate():
    summary = summarize([], 0, 1.0, SLO(None, None, None), (50.0,))
    result = BenchResult(BenchConfig(), "m", "", 0.0, [], [], [], summary)
    assert "Acceptance rate" not in format_summary(result)
    summary.spec_decode = spec_decode_delta({"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0},
                                            parse_spec_counters(PDSERVE))
    text = format_summary(result)
    assert "Acceptance rate:" in text and "0.550" in text and "3.20" in text
    assert summary.to_dict()["spec_decode"]["acceptance_rate"] == 0.55
