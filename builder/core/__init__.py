"""The builder's core: errors, running commands, output and progress, paths and state, the run's Context,
the container engine, secrets, the version as the builder takes it. Every stage may import it; it imports no stage.
"""
