"""Demos, offline models and datasets: the app around the library, never imported by ``import hf_tbn``.

The CLI demo, the tests and the scripts import these modules on use; the library itself
(``hf_tbn``, ``hf_tbn.kernels``, ``hf_tbn.mcu_export``) never does.
"""
