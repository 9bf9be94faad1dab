"""Integrations of the fusion ops into the programs that use them.

- :mod:`.hf`: C2C generation with Hugging Face ``transformers`` models (the ``hf`` extra).
- :mod:`.alignment`: the token alignment between two tokenizers (the research token map and
  chat-message layout, and character coverage; torch only).
- :mod:`.hf_bench`: end-to-end time to first token and the decode-step fusion, for ``c2c-bench``.

Submodules are imported on use, so ``transformers`` stays optional.
"""
