"""bcr_verify: differential and property-based verification of LLM prefix (KV) caches."""
