"""Exporter of small TBN models to microcontroller C (installed as ``hf_tbn.mcu_export``)."""
