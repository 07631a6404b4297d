"""Talking to teachers and judges behind an OpenAI-compatible API: `collect` (answers to prompts),
`bootstrap` (new prompts like a few seeds), `judge` (pairwise preferences)."""
