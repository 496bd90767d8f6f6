"""`python -m moray.deploy.cli`: the `moray` command."""

import sys

from moray.deploy.cli import main

sys.exit(main())
