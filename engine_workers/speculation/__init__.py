"""Grammar-aware speculative decoding inside vLLM's engine-core process.

vLLM verifies drafts under the grammar mask (a draft the grammar forbids has
probability 0 and is never accepted). We supply the drafts from the scheduler, where
each request's grammar matcher lives: tokens the grammar forces, then n-grams from
the request's prompt, its sibling samples and earlier rounds of the same prompt.
"""
