"""HypoFuzz targets: bcr_verify's own implementations in lockstep, for campaigns of hours.

Named outside pytest's ``test_*.py`` pattern, so the suite does not collect it; name it::

    hypothesis fuzz -n 2 --host 127.0.0.1 -- tests/fuzz_lockstep.py

A failure HypoFuzz finds is kept in the shared example database (``.hypothesis/``):
``pytest tests/fuzz_lockstep.py`` replays it and saves its trace to ``corpus/traces``.
"""

from bcr_verify.testing import lockstep_test_case

TestReferenceFuzz = lockstep_test_case(
    ["reference", "bcr_verify.models.reference:ReferenceCache"], 4)
TestSGLangRadixFuzz = lockstep_test_case(["reference", "sglang-radix"], 16)
TestSGLangUnifiedFuzz = lockstep_test_case(
    ["reference", "sglang-unified-py", "sglang-unified-rust"], 16)
TestVLLMFuzz = lockstep_test_case(["reference", "vllm-apc"], 16)
