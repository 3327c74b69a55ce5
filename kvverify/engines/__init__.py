"""Serving engines verified end to end: a drawn schedule of requests run through an engine (continuous batching,
paged blocks shared between requests, chunked prefill, preemption), every request compared with itself generated
alone, with no cache.

- :mod:`~kvverify.engines.schedule`: the drawn schedule (model, knobs, requests), engine-neutral;
- :mod:`~kvverify.engines.strategies`: Hypothesis strategies for schedules;
- :mod:`~kvverify.engines.adapter`: what an engine adapter provides; :mod:`~kvverify.engines.registry` names them;
- :mod:`~kvverify.engines.transformers_cb`: transformers' continuous batching, bit for bit;
- :mod:`~kvverify.engines.oracle`: each request alone, no cache, under :mod:`~kvverify.engines.kernels`;
- :mod:`~kvverify.engines.properties` and :mod:`~kvverify.engines.runner`: the properties and their run;
- :mod:`~kvverify.engines.mutants`: bugs planted into an engine at run time, to show the search bites;
- :mod:`~kvverify.engines.vllm_engine` and :mod:`~kvverify.engines.vllm_check` (``kvverify verify-engine vllm``):
  vLLM's CPU engine (its own environment, ``tox -e engine-vllm``) against the reference model within a measured
  tolerance, serving the reference weights written as a Llama checkpoint (:mod:`~kvverify.engines.llama_checkpoint`).
"""
