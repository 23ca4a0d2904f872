"""Stage 5, the image: a class and its gated models rendered into a build context (Containerfile,
overlays, release.json), built with the engine, rechunked by package, linted, recorded (`kiln build`).
"""
