"""Sub-commands of the ``mergevq`` command line; each module exposes ``register(subparsers)``."""
