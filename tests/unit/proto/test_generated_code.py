"""The checked-in generated protobuf/gRPC modules match what `make proto` would write now."""

from pdserve.proto.generate import check


def test_generated_code_is_current():
    stale = check()
    assert not stale, f"generated code is stale, run `make proto`: {stale}"
