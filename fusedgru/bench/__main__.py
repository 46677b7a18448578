"""`python -m fusedgru.bench ARGS`: the same as `fusedgru bench ARGS`."""

import sys

from .command import main

sys.exit(main())
