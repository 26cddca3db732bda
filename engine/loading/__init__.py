"""Loading models: specs, folders, GGUF, tiny models, architecture layouts, the model store."""
