"""The OpenAI-compatible server (`tramontane serve`): `engine.py` (continuous batching on the project's own
model code) apart from the HTTP layer (`app.py`)."""
