"""`python -m cifar_transfer ...` (what `torchrun -m cifar_transfer` needs): the same command
line."""

import sys

from .cli import main

sys.exit(main())
