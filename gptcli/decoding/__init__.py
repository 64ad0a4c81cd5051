"""From ids to text: sampling, the decoders, generation (plain, batched, speculative), sessions."""
