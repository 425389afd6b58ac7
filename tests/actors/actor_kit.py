"""Constants the actors tests share (a module of its own: `conftest` names collide across folders)."""

SECRET = b"0123456789abcdef0123456789abcdef"
