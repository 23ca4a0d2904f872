"""Stage 3, what images are built from: the offline Debian base (mmdebstrap), the package mirrors, the
runtime's pinned wheels, foreign architectures through qemu-user, and whether this machine can build a class.
"""
