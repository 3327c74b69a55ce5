"""llama.cpp through llama-cpp-python, tested from outside: its KV cache lives in C++, so it is checked by what a
user sees (logits and chosen tokens) after incremental evaluation, crops, saved and restored states and prefix
reuse, each against a fresh evaluation of the same tokens, within a measured tolerance.

- :mod:`~kvverify.adapters.llamacpp.gguf_export`: the reference model's weights as a GGUF file (``gguf``);
- :mod:`~kvverify.adapters.llamacpp.session`: the one module that imports ``llama_cpp``;
- :mod:`~kvverify.adapters.llamacpp.model`: the llama-shaped reference model and its export;
- :mod:`~kvverify.adapters.llamacpp.oracle`: fresh evaluations, the checks' oracle;
- :mod:`~kvverify.adapters.llamacpp.noise`: the measured noise floor the tolerance rests on;
- :mod:`~kvverify.adapters.llamacpp.programs` and :mod:`~kvverify.adapters.llamacpp.interpreter`: drawn operation
  programs (eval, crop, save/load state, generate, create_completion with a ``LlamaRAMCache``) and their checks;
- :mod:`~kvverify.adapters.llamacpp.checks`: the checks as ``verify-libs`` runs them;
- :mod:`~kvverify.adapters.llamacpp.known`: the upstream failure they find, with its fixed example.
"""
