"""Constants shared by the API tests and their fixtures."""

from pathlib import Path

API_KEY = "test-key-123"
PROMPT = "Name three colors of the rainbow."
MAX_TOKENS = 24
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
