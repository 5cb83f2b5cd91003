"""`python -m cifar_dist.cli`: the cifar-dist command."""

import sys

from cifar_dist.cli.main import main

sys.exit(main())
