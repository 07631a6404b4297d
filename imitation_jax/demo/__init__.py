"""The demo's synthetic world: conversations in a teacher style and a tiny tokenizer trained on them."""
