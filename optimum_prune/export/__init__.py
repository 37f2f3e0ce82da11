"""Outputs for the engines people serve with: GGUF for llama.cpp (`gguf`), the Nemotron-NAS form of
heterogeneous Llama-family models (`nemotron_nas`), and which engine runs which output (`engines`)."""
