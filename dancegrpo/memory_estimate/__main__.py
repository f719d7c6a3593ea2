"""`python -m dancegrpo.memory_estimate configs/<recipe>.yaml [...]` (see the package docstring)."""
from .estimate import main

raise SystemExit(main())
