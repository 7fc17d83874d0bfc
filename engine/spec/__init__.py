"""Speculative decoding: proposers (n-gram prompt lookup, draft model), the rejection sampler that
verifies their proposals against the target model, and the `Speculator` the scheduler and engine
call. The scheduler owns the blocks the proposals are verified in; this package never allocates
target KV."""
