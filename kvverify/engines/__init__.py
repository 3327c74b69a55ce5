"""Serving engines verified end to end: a drawn schedule of requests run through an engine (continuous batching,
paged blocks shared between requests, chunked prefill, preemption), every request compared with itself generated
alone, with no cache.

- :mod:`~kvverify.engines.schedule`: the drawn schedule (model, knobs, requests), engine-neutral, and the space of
  schedules an engine can run;
- :mod:`~kvverify.engines.strategies`: Hypothesis strategies for schedules, within an engine's space;
- :mod:`~kvverify.engines.adapter`: what an engine adapter provides; :mod:`~kvverify.engines.registry` names them;
- :mod:`~kvverify.engines.oracle`: what each request must equal: alone, no cache, bit for bit under
  :mod:`~kvverify.engines.kernels`, or the reference model within a measured tolerance;
- :mod:`~kvverify.engines.transformers_cb`: transformers' continuous batching, bit for bit;
- :mod:`~kvverify.engines.vllm_engine`: vLLM's CPU engine (its own environment, ``tox -e engine-vllm``) within a
  measured tolerance, serving the reference weights written as a Llama checkpoint
  (:mod:`~kvverify.engines.llama_checkpoint`);
- :mod:`~kvverify.engines.properties` and :mod:`~kvverify.engines.runner`: the properties and their run;
- :mod:`~kvverify.engines.mutants`: bugs planted into transformers' engine at run time, to show the search bites.
"""
