"""Stage 1, the spec: a hardware class read from images/*.yaml into a strict model, the rules across its
fields, what it contains, the names Kiln gives what it builds, and the generated reference.
"""
