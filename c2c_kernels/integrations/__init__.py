"""Integrations of the fusion ops into the programs that use them.

- :mod:`.hf`: C2C generation with Hugging Face ``transformers`` models (the ``hf`` extra).
- :mod:`.alignment`: the token alignment between two tokenizers (torch only).
- :mod:`.hf_bench`: end-to-end time to first token, for ``c2c-bench``.

Submodules are imported on use, so ``transformers`` stays optional.
"""
