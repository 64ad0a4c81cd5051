"""GPT-2 as the book writes it (``gpt``), its key/value cache and the attention functions decoders pass in."""
