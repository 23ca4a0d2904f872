"""Stage 7, the release: the local registry, signed pushes, SBOM and provenance, the TUF channels,
rollouts, and the release report (`kiln release`).
"""
