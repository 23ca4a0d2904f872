"""`python -m builder.cli`, the same as `kiln`."""

from builder.cli import main

main()
