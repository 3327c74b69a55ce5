"""The fast decode engine: one decoded token through the reference model's weights in one function, for fast
numerics (what ``generate`` drives and what the profiles time)."""
