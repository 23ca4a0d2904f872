"""Stage 2, the keys: the release key and its TUF half, and what images bake from them (every image trusts them)."""
