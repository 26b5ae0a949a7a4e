"""Model families the loops load: one small adapter each (how to embed images, which RoPE, the mode prefixes)."""
