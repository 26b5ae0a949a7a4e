"""BPO's strict modes as a vLLM logits processor, for vLLM's ``vllm.logits_processors`` entry point (setup.py).

Importable only where vLLM is installed (vLLM imports it when it loads its entry points): the class is built on
vLLM's v1 ``LogitsProcessor`` by :func:`r4b_fast.integrations.trl_strict.vllm_logits_processor_class`, whose logic is
unit-tested on plain tensors (tests/test_trl_vlm_strict.py). vLLM itself cannot run on this project's CPU machines:
this path has not been run inside vLLM. Rows opt in through ``SamplingParams.extra_args["r4b_strict"]``.
"""

from r4b_fast.integrations.trl_strict import vllm_logits_processor_class

R4BStrictModesLogitsProcessor = vllm_logits_processor_class()
