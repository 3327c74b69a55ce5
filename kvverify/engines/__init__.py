"""Serving engines driven end to end: requests in, tokens and per-step logits out, each request compared with
the reference model generating it alone without a cache.

:mod:`kvverify.engines.vllm_engine` is vLLM's adapter (the only module that imports vLLM), and
:mod:`kvverify.engines.vllm_check` its Hypothesis check. The model an engine serves is the reference model's
weights written as a Llama checkpoint (:mod:`kvverify.engines.llama_checkpoint`), so the oracle is kvverify's own.
"""
