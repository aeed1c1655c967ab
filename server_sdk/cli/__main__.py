"""`python -m server_sdk.cli ARGS` is `devft ARGS`."""

import sys

from server_sdk.cli.main import main

sys.exit(main())
