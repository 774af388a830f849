"""``python -m mixdq_jax.cli``: the ``mixdq`` command."""

from mixdq_jax.cli import main

raise SystemExit(main())
