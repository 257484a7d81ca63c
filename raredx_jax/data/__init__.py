"""Data: HPO ontology, knowledge corpus, simulated and imported clinical notes, prompts, tokenizers, pipelines."""
