"""Constants shared by the API tests and their fixtures."""

import secrets
from pathlib import Path

API_KEY = secrets.token_hex(32)  # drawn per run: a key file must hold a real secret
PROMPT = "Name three colors of the rainbow."
MAX_TOKENS = 24
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
